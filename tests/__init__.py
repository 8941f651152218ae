"""
chatterd's test suite.  Run it with ``./scripts/test`` (pytest driving trial test cases).
"""
