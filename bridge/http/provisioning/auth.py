"""Credentials of the provisioning dialect: a vendor's X-Exosite-Token or vendor CIK
(X-Exosite-CIK) on /manage/..., and the optional X-Exosite-Vendor that reaches a model another
vendor shared (only the enable/disable/re-enable operations and the serial numbers' reads take it,
CATALOG 002 "Auth"). Activation takes no credential: its form names the client."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from bridge.core.errors import Forbidden, Unauthorized
from bridge.core.provisioning.common import Vendor
from bridge.http.common.auth import CIK_HEADER, CORE, DEVICE_CIK, Auth, cik

VENDOR_HEADER = "X-Exosite-Vendor"


@dataclass(frozen=True)
class VendorCaller:
    vendor: Vendor
    as_vendor: str | None  # X-Exosite-Vendor: whose shared model {model} names (None: the caller's own)


async def _vendor(request: web.Request) -> Vendor:
    # An empty header counts as absent (activation clients send them empty, CATALOG 002 Decisions).
    token = request.headers.get("X-Exosite-Token", "").strip() or None
    return await request.app[CORE].provisioning.vendors.authenticate(token=token, cik=cik(request))


async def require_vendor(request: web.Request) -> VendorCaller:
    """The model's own vendor: X-Exosite-Vendor, if sent, must name the caller itself."""
    vendor = await _vendor(request)
    named = request.headers.get(VENDOR_HEADER, "").strip()
    if named and named != vendor.name:
        raise Forbidden(
            f"a shared model allows only enabling and disabling its serial numbers ({VENDOR_HEADER})"
        )
    return VendorCaller(vendor, None)


async def require_vendor_or_share(request: web.Request) -> VendorCaller:
    vendor = await _vendor(request)
    return VendorCaller(vendor, request.headers.get(VENDOR_HEADER, "").strip() or None)


async def require_device(request: web.Request) -> str:
    """The device CIK of GET /download, checked to be a current one before the query is read (a
    vendor's CIK or a revoked one is 401 whatever the request says)."""
    device_cik = cik(request)
    if device_cik is None:
        raise Unauthorized(f"{CIK_HEADER} (the device CIK from activation) is required")
    await request.app[CORE].provisioning.serials.client(device_cik)
    return device_cik


_SCHEMES = {
    "vendorToken": {
        "type": "apiKey",
        "in": "header",
        "name": "X-Exosite-Token",
        "description": "The vendor token `thingbridge vendor add` printed.",
    },
    "vendorCik": {
        "type": "apiKey",
        "in": "header",
        "name": CIK_HEADER,
        "description": "The vendor CIK `thingbridge vendor add` printed (40 hex characters).",
    },
}
_SECURITY = ({"vendorToken": []}, {"vendorCik": []})
VENDOR = Auth(require_vendor, _SECURITY, _SCHEMES)
VENDOR_OR_SHARE = Auth(require_vendor_or_share, _SECURITY, _SCHEMES)
DEVICE = Auth(require_device, ({"deviceCik": []},), DEVICE_CIK)
