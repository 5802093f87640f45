"""Puts tests/ on sys.path so test files can ``from models import ...``."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
