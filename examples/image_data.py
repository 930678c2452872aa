"""The offline image-caption data, the embedded image encoder and the caption reward (issue #26, in progress).

    python examples/image_data.py
"""
from rewards import build_reward
from rlprefix.train.image_data import load_image_captions
from rlprefix.train.vision_encoder import default_encoder

train = load_image_captions("builtin:shapes")            # 48 combinations; "builtin:digits" for real digits
heldout = load_image_captions("builtin:shapes:heldout")  # 12 combinations never drawn in training
print(len(train), "training scenes, e.g.", repr(train[0].caption))

encoder = default_encoder()                              # trained once (~20 s), then cached; not CLIP
features = encoder.encode([x.image for x in heldout])
print("held-out features:", tuple(features.shape))

reward = build_reward("caption_correctness")
guesses = ["a red circle at the top left", "a blue square", "something green"]
print(reward(["Describe the image."] * 3, guesses, captions=[x.caption for x in heldout[:3]],
             images=[x.image for x in heldout[:3]]))
