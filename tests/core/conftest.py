import sys
from pathlib import Path

# the case modules of the contract suite import each other as top-level modules
sys.path.insert(0, str(Path(__file__).parent))
