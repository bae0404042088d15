"""``treeckpt.dcp.logger``: as ``torch.distributed.checkpoint.logger``.

torch's module has no public names. Here ``logger`` is the standard
``logging`` logger of the facade, ``"treeckpt.dcp"``: keys of a checkpoint a
load leaves out are reported on it at INFO level. Configure it as any
``logging`` logger.
"""

import logging

from treeckpt.dcp.logging_handlers import DCP_LOGGER_NAME as DCP_LOGGER_NAME

__all__: list[str] = []

logger = logging.getLogger("treeckpt.dcp")
