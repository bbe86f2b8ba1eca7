"""Runnable sample sagas with their participant services."""
