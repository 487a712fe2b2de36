"""Shared test helpers: servers in and out of process, a fake batch queue, fault injection, the
tiny-model zoo and a stand-in server for the notebook helpers. Test modules import these, never
each other."""
