"""What the tests share: small reference models and their torch twins, checks of the
factored forward, helpers for checkpoints, several processes, notebooks and examples.

Test files import it as ``support`` (``tests/conftest.py`` puts ``tests/`` on ``sys.path``).
"""
