"""Browser end-to-end tests. A package so that its conftest.py does not take over the
module name `conftest`, which the tests in tests/ import their helpers from."""
