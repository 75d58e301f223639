"""The ``hpcserve`` command line: thin commands that call API functions and format the result."""
