"""What the app and the trainers both need of the built-in Shapes world, importable without training/.

- `text`: checks on a word-level tokenizer (the built-in model's): which prompt words it lacks, its words;
- `annotators`: the learned depth and pose annotators' networks, their files and their inference.

The app imports this package and never training/; training/ imports it too, so each thing is written once.
"""

IMAGE_SIZE = 64  # pixels per side of a Shapes-world picture (what the world renders and the annotators see)
NUM_KEYPOINTS = 18  # OpenPose body-18 keypoints of a person
