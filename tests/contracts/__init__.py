"""Contract test suites: one base class per port, subclassed once per backend."""
