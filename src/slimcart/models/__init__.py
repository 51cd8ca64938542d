"""Model architectures, registered by name so a saved spec rebuilds them without pickle."""
from .registry import build, register_model, spec  # noqa: F401
from . import cnn, deepfm, dlrm, text_classifier  # noqa: F401,E402  (registration)
from . import hf, zoo  # noqa: F401,E402  (registration: Hugging Face, torchvision, timm)
from . import mlp  # noqa: F401,E402  (registration: LeNet-300-100 style MLP)
from . import efficientnet  # noqa: F401,E402  (registration: ImageNet-pretrained EfficientNet-Lite0)
