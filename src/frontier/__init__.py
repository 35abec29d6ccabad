"""frontier: does restructuring attention buy what quantizing weights buys — measured."""
import os as _os

# torchao tries to load CUDA-only extension .so files on import and prints a harmless
# failure for each on CPU machines (../shared/STACK-FACTS.md).
_os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")

__version__ = "0.1.0"
