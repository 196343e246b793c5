"""Weight initialisation shared by the encoders."""
from torch import nn


def init_conv_bn_(module: nn.Module) -> None:
    """Kaiming-normal (fan_out, relu) weights for every conv under module; BNs at weight 1,
    bias 0, fresh running statistics."""
    for m in module.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
            m.reset_running_stats()
