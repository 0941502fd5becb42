"""The vendor's side (extension routes under /manage, the operator token): products, their
template versions and firmware, their serial numbers. What they store is the upgrader's and
provisioning's (bridge/core/firmware.py): the rollout profiles, accounts and staged rollouts of a
product's software are managed with the upgrader dialect."""

from __future__ import annotations

import msgspec
from aiohttp import hdrs, web

from bridge.core.accounts import User
from bridge.core.errors import TooLarge
from bridge.http.common.auth import USER
from bridge.http.common.operation import Answered, Call, Empty, Form, Operations, RawBody, Stream
from bridge.http.firmware import models
from bridge.http.provisioning.answers import CSV, OCTET
from bridge.http.provisioning.routes import BLOB, CSV_LINES

api = Operations()
TAG = "firmware-manage"
GONE = Empty("No Content: deleted.")


@api.get("/manage/products", "Your products", tag=TAG, auth=USER, answer=list[models.Product], errors=(401,))
async def list_products(call: Call[User, None, None, None]) -> list[models.Product]:
    return msgspec.convert(await call.core.firmware.products(call.principal.id), list[models.Product])


@api.put(
    "/manage/products/{productId}",
    "Create or rebind a product",
    tag=TAG,
    auth=USER,
    path_model=models.ProductPath,
    body=models.ProductBody,
    body_required=True,
    answer=models.Product,
    alternatives={201: models.Product},
    errors=(400, 401, 409, 413),
    description="Binds an upgrader software of yours (its versions are the product's template versions) to a "
    "model of one of your provisioning vendors (its serial numbers are the product's); 201 when created. 409: "
    "the id is another owner's, or the software or model is in another product. enabled=false refuses "
    "activations.",
)
async def put_product(
    call: Call[User, models.ProductPath, None, models.ProductBody],
) -> models.Product | Answered:
    doc, created = await call.core.firmware.put_product(
        call.principal.id, call.path.productId, msgspec.to_builtins(call.body)
    )
    product = msgspec.convert(doc, models.Product)
    return Answered(201, product) if created else product


@api.get(
    "/manage/products/{productId}",
    "One product",
    tag=TAG,
    auth=USER,
    path_model=models.ProductPath,
    answer=models.Product,
    errors=(400, 401, 404),
)
async def get_product(call: Call[User, models.ProductPath, None, None]) -> models.Product:
    return msgspec.convert(
        await call.core.firmware.product(call.principal.id, call.path.productId), models.Product
    )


@api.delete(
    "/manage/products/{productId}",
    "Delete a product (the binding)",
    tag=TAG,
    auth=USER,
    path_model=models.ProductPath,
    status=204,
    answer=GONE,
    errors=(400, 401, 404),
    description="The software, its versions, the model, its serial numbers and their things stay.",
)
async def delete_product(call: Call[User, models.ProductPath, None, None]) -> web.Response:
    await call.core.firmware.delete_product(call.principal.id, call.path.productId)
    return web.Response(status=204)


@api.get(
    "/manage/products/{productId}/versions",
    "The product's template versions, oldest release first",
    tag=TAG,
    auth=USER,
    path_model=models.ProductPath,
    answer=list[models.VersionDoc],
    errors=(400, 401, 404),
)
async def list_versions(call: Call[User, models.ProductPath, None, None]) -> list[models.VersionDoc]:
    found = await call.core.firmware.versions(call.principal.id, call.path.productId)
    return msgspec.convert(found, list[models.VersionDoc])


@api.put(
    "/manage/products/{productId}/versions/{version}",
    "Create or update a template version",
    tag=TAG,
    auth=USER,
    path_model=models.VersionPath,
    body=models.VersionBody,
    body_required=True,
    answer=models.VersionDoc,
    alternatives={201: models.VersionDoc},
    errors=(400, 401, 404, 413),
    description="The upgrader's version of the product's software (201 when created), its downloadUrl the "
    "device path of its firmware; rolloutProfiles: the upgrader's profiles it targets (none: every device "
    "in no account).",
)
async def put_version(
    call: Call[User, models.VersionPath, None, models.VersionBody],
) -> models.VersionDoc | Answered:
    doc, created = await call.core.firmware.put_version(
        call.principal.id, call.path.productId, call.path.version, msgspec.to_builtins(call.body)
    )
    version = msgspec.convert(doc, models.VersionDoc)
    return Answered(201, version) if created else version


@api.get(
    "/manage/products/{productId}/versions/{version}",
    "One template version",
    tag=TAG,
    auth=USER,
    path_model=models.VersionPath,
    answer=models.VersionDoc,
    errors=(400, 401, 404),
)
async def get_version(call: Call[User, models.VersionPath, None, None]) -> models.VersionDoc:
    found = await call.core.firmware.version(call.principal.id, call.path.productId, call.path.version)
    return msgspec.convert(found, models.VersionDoc)


@api.delete(
    "/manage/products/{productId}/versions/{version}",
    "Delete a template version and its firmware",
    tag=TAG,
    auth=USER,
    path_model=models.VersionPath,
    status=204,
    answer=GONE,
    errors=(400, 401, 404),
)
async def delete_version(call: Call[User, models.VersionPath, None, None]) -> web.Response:
    await call.core.firmware.delete_version(call.principal.id, call.path.productId, call.path.version)
    return web.Response(status=204)


@api.put(
    "/manage/products/{productId}/versions/{version}/firmware",
    "Upload a version's firmware",
    tag=TAG,
    auth=USER,
    path_model=models.VersionPath,
    body=RawBody(
        "The firmware (or media content); its Content-Type is stored and answered on download. At most "
        "provisioning.max_content_size bytes.",
        {OCTET: BLOB},
        streamed=True,
    ),
    answer=models.VersionDoc,
    errors=(400, 401, 404, 413),
    description="Stored as the model's content entity fw-<version> in the provisioning content store "
    "(replacing its blob); the version must exist. An empty body is refused (400) and replaces nothing.",
)
async def upload(call: Call[User, models.VersionPath, None, Stream]) -> models.VersionDoc:
    limit = call.core.cfg.provisioning.max_content_size
    length = call.request.content_length
    if length is not None and length > limit:  # refused before a byte is read
        raise TooLarge(f"the firmware is larger than provisioning.max_content_size ({limit} bytes)")
    found = await call.core.firmware.upload(
        call.principal.id,
        call.path.productId,
        call.path.version,
        call.request.headers.get(hdrs.CONTENT_TYPE, OCTET),
        call.body.chunks,
    )
    return msgspec.convert(found, models.VersionDoc)


@api.post(
    "/manage/products/{productId}/serials",
    "Enrol serial numbers (CSV)",
    tag=TAG,
    auth=USER,
    path_model=models.ProductPath,
    body=Form(
        None,
        "`<serial number>[,<extra>]` lines (RFC 4180), up to provisioning.max_import_size bytes.",
        {CSV: CSV_LINES},
        lambda cfg: cfg.provisioning.max_import_size,  # spooled to disk as provisioning's import
    ),
    body_required=True,
    answer=models.Imported,
    errors=(400, 401, 404, 409, 413),
    description="Into the product's model, all or none (409 naming the first that exists), as provisioning's "
    "import; any size with `thingbridge firmware import-serials`.",
)
async def import_serials(call: Call[User, models.ProductPath, None, Stream]) -> models.Imported:
    added = await call.core.firmware.import_serials(call.principal.id, call.path.productId, call.body.chunks)
    return models.Imported(added)


@api.get(
    "/manage/products/{productId}/serials/{serialNumber}",
    "One serial number: its status and thing",
    tag=TAG,
    auth=USER,
    path_model=models.SerialPath,
    answer=models.Serial,
    errors=(400, 401, 404),
)
async def get_serial(call: Call[User, models.SerialPath, None, None]) -> models.Serial:
    found = await call.core.firmware.serial(call.principal.id, call.path.productId, call.path.serialNumber)
    return msgspec.convert(found, models.Serial)


@api.put(
    "/manage/products/{productId}/serials/{serialNumber}",
    "Disable or enable a serial number",
    tag=TAG,
    auth=USER,
    path_model=models.SerialPath,
    body=models.SerialBody,
    body_required=True,
    answer=models.Serial,
    errors=(400, 401, 404, 413),
    description="Disabled: its API key stops working, its thing is disabled (sessions closed) and activations "
    "are refused (403), also for a serial number never activated; enabled: the next activation issues a key "
    "(an unused serial number stays unused: activation needs no enable step).",
)
async def set_serial(call: Call[User, models.SerialPath, None, models.SerialBody]) -> models.Serial:
    found = await call.core.firmware.set_serial(
        call.principal.id, call.path.productId, call.path.serialNumber, call.body.enabled
    )
    return msgspec.convert(found, models.Serial)
