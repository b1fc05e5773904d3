"""Small, offline benchmark datasets: shortcuts built from sklearn's bundled 8x8 digits, and readers of files.

- :class:`ColorDigits` (ColorMNIST analogue): the class colour is reversed between train and test.
- :class:`DecoyDigits` (DecoyMNIST analogue): a corner patch encodes the class in train only, with
  a mask of the patch for explanation penalties such as RRR.
- :class:`AdultIncome`: the UCI Adult table from a CSV you pass, with sex and race codes for fairness.
- :class:`EmotionTemplates`: a generated emotion corpus with gender as treated concept and a
  counterfactual (gender-swapped) twin of every sentence, for concept-effect estimation.
- :class:`SSTShortcut`: the Stanford Sentiment Treebank from its PTB tree files, with CDEP's decoy-word, article
  and gender shortcuts planted into the training split and span masks of the planted tokens.
- :class:`PlantedAssociation`: a generated corpus where one name always precedes one occupation, with its
  word-level tokenizer, for training a small causal LM whose attributions have a known answer.
"""

from lightning_xai.datasets.adult import AdultIncome
from lightning_xai.datasets.color_digits import ColorDigits, digit_colours
from lightning_xai.datasets.decoy_digits import DecoyDigits, decoy_levels
from lightning_xai.datasets.emotion_templates import EmotionTemplates
from lightning_xai.datasets.planted_association import PlantedAssociation, word_tokenizer
from lightning_xai.datasets.sst import LengthBucketSampler, SSTShortcut, Vocabulary, length_buckets, read_sst

__all__ = [
    "AdultIncome",
    "ColorDigits",
    "DecoyDigits",
    "EmotionTemplates",
    "LengthBucketSampler",
    "PlantedAssociation",
    "SSTShortcut",
    "Vocabulary",
    "decoy_levels",
    "digit_colours",
    "length_buckets",
    "read_sst",
    "word_tokenizer",
]
