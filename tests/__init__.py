"""
chatterd's test suite: trial test cases.  Run it with ``scripts/test`` (trial,
one worker per CPU) or ``python -m twisted.trial tests``.
"""
