"""slimcart: make the AI models of an e-commerce platform small and fast, and measure it."""
__version__ = "0.1.0"

from .errors import DataError, ModelError, RecipeError, SlimcartError, UsageError  # noqa: E402,F401
from .recipe import MeasureConfig, Recipe  # noqa: E402,F401
from .tasks import load_task  # noqa: E402,F401
from .pipeline import compress  # noqa: E402,F401
