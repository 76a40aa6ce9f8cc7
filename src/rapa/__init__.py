"""rapa: RAPA-ConvNets, convolutions with replicated kernel matrices for analog arrays.

Rasch, Gokmen, Rigotti & Haensch, "RAPA-ConvNets: Modified Convolutional Networks for
Accelerated Training on Architectures With Analog Arrays", Front. Neurosci. 13:753 (2019).
"""

from rapa import functional, schemes
from rapa.convert import balanced_tiles, convert
from rapa.schemes import SCHEMES
from rapa.tiled_conv import TiledConv2d

__version__ = "0.1.0"

__all__ = ["TiledConv2d", "convert", "balanced_tiles", "functional", "schemes", "SCHEMES", "__version__"]
