"""Images for image-conditioned prefixes: offline image-caption data (`data`), frozen image encoders (`encoders`) and
the embedded default encoder trained at first use (`embedded`), and images bound to an image prefix (`conditions`).
Beside the prefixes (it loads frozen vision models with `models`) and below decoding, training and serving, which
all turn images into an image prefix's condition here."""
from rlprefix.images.conditions import image_features, is_image_prefix, with_images
from rlprefix.images.data import ImageCaption, caption_records, load_image, load_image_captions
from rlprefix.images.embedded import default_encoder, open_encoder
from rlprefix.images.encoders import SMALL_CNN, load_vision_encoder

__all__ = ["image_features", "is_image_prefix", "with_images", "ImageCaption", "caption_records", "load_image", "load_image_captions", "default_encoder", "open_encoder", "SMALL_CNN",
           "load_vision_encoder"]
