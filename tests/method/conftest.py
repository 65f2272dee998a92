import sys
from pathlib import Path

# Tests here share method_fakes.py; pytest's importlib mode does not put test dirs on sys.path.
sys.path.insert(0, str(Path(__file__).parent))
