"""User tools: launchers, benchmarks and GPU checks (run as scripts; importable as scripts.<name> by the tests)."""
