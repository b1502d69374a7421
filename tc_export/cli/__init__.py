"""The ``tc-export`` command line: flags are sugar for the configs in the library."""
