"""rapa: RAPA-ConvNets, convolutions with replicated kernel matrices for analog arrays.

Rasch, Gokmen, Rigotti & Haensch, "RAPA-ConvNets: Modified Convolutional Networks for
Accelerated Training on Architectures With Analog Arrays", Front. Neurosci. 13:753 (2019).
"""

from rapa import functional, schemes
from rapa.convert import balanced_tiles, convert
from rapa.lrn import WithinChannelLRN, within_channel_lrn
from rapa.models import ENLARGED_CHANNELS, ConvNet, build_model
from rapa.pooling import MixedPool2d, StochasticPool2d, make_pool
from rapa.schemes import SCHEMES
from rapa.tiled_conv import TiledConv2d
from rapa.voting import adaptive_vote, majority_vote, vote_predictions

__version__ = "0.1.0"

__all__ = [
    "TiledConv2d", "convert", "balanced_tiles", "functional", "schemes", "SCHEMES",
    "ConvNet", "build_model", "ENLARGED_CHANNELS",
    "StochasticPool2d", "MixedPool2d", "make_pool", "WithinChannelLRN", "within_channel_lrn",
    "majority_vote", "adaptive_vote", "vote_predictions", "__version__",
]
