"""One attestation round for one key request: evidence -> RCAR -> released bytes.

No kernel and no argv here: the handler (and ``--debug``) call :func:`obtain`.
"""

from __future__ import annotations

import errno as E

from ..errors import TsmError
from ..wire import rcar as p
from ..wire.envelope import TsmReport
from .client import RcarClient, ReleasedKey
from .config import ClientConfig
from .request import KeyRequest
from .tsm import ReportRequest, TsmClient

__all__ = ["ReleasedKey", "obtain"]


def obtain(config: ClientConfig, request: KeyRequest, *, deadline: float) -> ReleasedKey:
    tsm = TsmClient(config.tsm_root)
    provider = tsm.provider()
    tee = p.TEE_BY_PROVIDER.get(provider)
    if tee is None:
        raise TsmError(f"provider {provider!r} has no KBS tee type (known: {', '.join(p.TEE_BY_PROVIDER)})",
                       errno=E.ENODEV)

    def evidence(inblob: bytes) -> TsmReport:
        return tsm.get_report(ReportRequest(inblob, privlevel=request.privlevel,
                                            service_provider=config.service_provider,
                                            service_guid=config.service_guid), deadline=deadline)

    client = RcarClient(config.server_url, ca=config.server_ca, deadline=deadline)
    return client.fetch(str(request.resource), tee, evidence)
