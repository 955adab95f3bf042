"""The ``smlaas`` command line: thin commands over the library."""
