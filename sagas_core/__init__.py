"""sagas core."""
