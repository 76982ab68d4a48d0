"""Built-in adapter methods: one module per method; importing a module registers it."""

from . import lora  # noqa: F401
from . import bone  # noqa: F401
from . import allora  # noqa: F401
from . import ffa  # noqa: F401
from . import dylora  # noqa: F401
from . import smora  # noqa: F401
from . import lora_sb, nlora  # noqa: F401  (LoRA-XS / LoRA-SB; SLoRA / NLoRA / IntTune)
from . import flexora  # noqa: F401
from . import lq_lora  # noqa: F401
from . import gradnorm_lorp  # noqa: F401
from . import increlora  # noqa: F401
