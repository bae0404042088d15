"""``treeckpt.dcp.logging_handlers``: as ``torch.distributed.checkpoint.logging_handlers``.

torch's module has no public names; it registers the handler of DCP's event
logger, named :data:`DCP_LOGGER_NAME` (torch's constant, re-exported).
treeckpt's facade logs to the standard ``logging`` logger ``"treeckpt.dcp"``
(see :mod:`treeckpt.dcp.logger`).
"""

from torch.distributed.checkpoint.logging_handlers import DCP_LOGGER_NAME as DCP_LOGGER_NAME

__all__: list[str] = []
