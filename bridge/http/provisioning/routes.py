"""The Provisioning v1.1 operations this bridge serves (CATALOG 002, numbers below), below the
mount (default /provision). Where the document puts several operations on one method and path,
one route takes them all and dispatches by the catalog's rules (form fields, media type), so each
path is one OpenAPI operation whose description lists them. Trailing slashes are significant:
model/{model} is the model, model/{model}/ its serial numbers."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from aiohttp import hdrs, web

from bridge.core.errors import DomainError, Forbidden, Invalid, NotFound, TooLarge
from bridge.core.provisioning.content import ContentInfo
from bridge.core.provisioning.groups import expire, member_type
from bridge.http.common.operation import Call, Empty, ErrorDoc, Form, Media, Operations, RawBody, Stream
from bridge.http.provisioning import models
from bridge.http.provisioning.answers import (
    CSV,
    NO_RECORDS,
    OCTET,
    RESET,
    STRING,
    TEXT,
    BlobResponse,
    csv_answer,
    csv_media,
    reset,
    text_answer,
)
from bridge.http.provisioning.auth import DEVICE, VENDOR, VENDOR_OR_SHARE, VendorCaller

api = Operations()
TAG = "provisioning"
WRITE = (400, 401, 403, 404)
CSV_LINES = {"type": "string", "description": "RFC 4180 records, one a line"}


# ---- activation ---------------------------------------------------------------------------------
@api.post(
    "/activate",
    "Activate a device (#1)",
    tag=TAG,
    body=Form(models.ActivateForm, "The client: vendor, model and serial number."),
    answer=Media(TEXT, "The device's CIK (40 hex characters), returned this once.", STRING),
    errors=(400, 404, 409, 429),
    description="No credential: the form names the client (empty X-Exosite-CIK / X-Exosite-Token headers "
    "are ignored). 404: no such client; 409: the serial number is not enabled for activation (no client, "
    "enable expired, activated already, disabled); 429: too many unknown serial numbers from this address "
    "(an exponential back-off). The CIK is the device's credential from now on.",
)
async def activate(call: Call[None, None, None, models.ActivateForm]) -> web.Response:
    form, request = call.body, call.request
    cik = await call.core.provisioning.serials.activate(
        form.vendor,
        form.model,
        form.sn,
        remote=request.remote or "",
        agent=request.headers.get("User-Agent", ""),
    )
    return text_answer(cik)


# ---- models -------------------------------------------------------------------------------------
@api.get(
    "/manage/model/",
    "List models (#30, #31)",
    tag=TAG,
    auth=VENDOR,
    query=models.ModelsQuery,
    answer=csv_media("<model>; with show=shared <vendorname>,<model>"),
    alternatives={204: NO_RECORDS},
    errors=(400, 401, 403),
)
async def list_models(call: Call[VendorCaller, None, models.ModelsQuery, None]) -> web.Response:
    serials = call.core.provisioning.serials
    if call.query.show == "shared":
        return csv_answer(await serials.list_shared_models(call.principal.vendor))
    return csv_answer([name] for name in await serials.list_models(call.principal.vendor))


@api.post(
    "/manage/model/",
    "Create a model (#32) or delete one (#33, delete=true)",
    tag=TAG,
    auth=VENDOR,
    body=Form(models.ModelForm, "model, rid and options[] (create), or delete=true and model."),
    status=205,
    answer=RESET,
    errors=(400, 401, 403, 409),
)
async def create_or_delete_model(call: Call[VendorCaller, None, None, models.ModelForm]) -> web.Response:
    form, serials, vendor = call.body, call.core.provisioning.serials, call.principal.vendor
    if form.delete:
        await serials.delete_model(vendor, form.model)
    elif form.rid is None:
        raise Invalid("rid is required to create a model")
    else:
        await serials.create_model(vendor, form.model, form.rid, form.options)
    return reset()


@api.get(
    "/manage/model/{model}",
    "Model information (#34)",
    tag=TAG,
    auth=VENDOR,
    path_model=models.ModelPath,
    answer=Media(CSV, "Form-encoded as the document shows it: rid=<rid>&options[]=<option>...", STRING),
    errors=(400, 401, 403, 404),
)
async def model_info(call: Call[VendorCaller, models.ModelPath, None, None]) -> web.Response:
    model = await call.core.provisioning.serials.model(call.principal.vendor, call.path.model)
    fields = [("rid", model.rid)] + [("options[]", option) for option in model.options]
    return text_answer(urlencode(fields), CSV)  # declared text/csv by the document (CATALOG 002 #10)


@api.put(
    "/manage/model/{model}",
    "Update a model (#35)",
    tag=TAG,
    auth=VENDOR,
    path_model=models.ModelPath,
    body=Form(models.ModelUpdate, "rid and options[] (replacing the stored ones)."),
    status=205,
    answer=RESET,
    errors=WRITE,
)
async def update_model(call: Call[VendorCaller, models.ModelPath, None, models.ModelUpdate]) -> web.Response:
    await call.core.provisioning.serials.update_model(
        call.principal.vendor, call.path.model, call.body.rid, call.body.options
    )
    return reset()


@api.delete(
    "/manage/model/{model}",
    "Delete a model (#36)",
    tag=TAG,
    auth=VENDOR,
    path_model=models.ModelPath,
    status=205,
    answer=RESET,
    errors=(400, 401, 403),
    description="With its serial numbers (the things they became are deleted) and shares; a missing model "
    "is deleted already.",
)
async def delete_model(call: Call[VendorCaller, models.ModelPath, None, None]) -> web.Response:
    await call.core.provisioning.serials.delete_model(call.principal.vendor, call.path.model)
    return reset()


# ---- serial numbers -----------------------------------------------------------------------------
@api.get(
    "/manage/model/{model}/",
    "List serial numbers (#37)",
    tag=TAG,
    auth=VENDOR_OR_SHARE,
    path_model=models.ModelPath,
    query=models.SerialsQuery,
    answer=csv_media("<sn>,<rid>,<extra> (rid empty without a client; extra empty through a share)"),
    alternatives={204: NO_RECORDS},
    errors=(400, 401, 403, 404),
    description="X-Exosite-Vendor: <vendor> lists a model that vendor shared, with only the serial numbers "
    "the caller enabled.",
)
async def list_serials(call: Call[VendorCaller, models.ModelPath, models.SerialsQuery, None]) -> web.Response:
    serials = await call.core.provisioning.serials.list_serials(
        call.principal.vendor,
        call.path.model,
        call.query.page(),
        as_vendor=call.principal.as_vendor,
        enabled_by=call.query.shared,
    )
    return csv_answer((s.sn, s.rid, s.extra) for s in serials)


@api.post(
    "/manage/model/{model}/",
    "Add serial numbers (#38, #39, #40) or remove them (#41, #42, delete=true)",
    tag=TAG,
    auth=VENDOR,
    path_model=models.ModelPath,
    body=Form(
        models.SerialsForm,
        "A form: sn (and extra) or sn[], with delete=true to remove them; or text/csv lines <sn>,<extra> "
        "to add, all or none in one transaction, up to provisioning.max_import_size bytes.",
        {CSV: CSV_LINES},
        lambda cfg: cfg.provisioning.max_import_size,
    ),
    status=205,
    answer=RESET,
    errors=(*WRITE, 409, 413),
)
async def add_or_remove_serials(
    call: Call[VendorCaller, models.ModelPath, None, models.SerialsForm | Stream],
) -> web.Response:
    serials, vendor, model, body = (
        call.core.provisioning.serials,
        call.principal.vendor,
        call.path.model,
        call.body,
    )
    if isinstance(body, Stream):
        await serials.import_csv(vendor, model, body.chunks)
        return reset()
    if (body.sn is None) == (body.sns is None):
        raise Invalid("give either sn or sn[]")
    names = [body.sn] if body.sn is not None else body.sns or []
    if body.delete:
        await serials.remove_serials(vendor, model, names)
    else:
        await serials.add_serials(vendor, model, [(sn, body.extra) for sn in names])
    return reset()


@api.delete(
    "/manage/model/{model}/",
    "Remove serial numbers (#43)",
    tag=TAG,
    auth=VENDOR,
    path_model=models.ModelPath,
    body=Form(
        None,
        "text/csv lines <sn> (CATALOG 002 #1: DELETE, so that POST text/csv means add).",
        {CSV: CSV_LINES},
    ),
    status=205,
    answer=RESET,
    errors=(*WRITE, 413),
    description="Their clients go with them: CIKs stop working, the things they became are deleted.",
)
async def remove_serials_csv(call: Call[VendorCaller, models.ModelPath, None, Stream]) -> web.Response:
    await call.core.provisioning.serials.remove_csv(call.principal.vendor, call.path.model, call.body.chunks)
    return reset()


@api.get(
    "/manage/model/{model}/{sn}",
    "Serial number information (#44), its groups (#45, show=groups) or activation log (#46, show=log)",
    tag=TAG,
    auth=VENDOR_OR_SHARE,
    path_model=models.SerialPath,
    query=models.SerialQuery,
    answer=csv_media(
        "<status>,<rid>,<extra> (status enabled, expired, activated or disabled); with show=log "
        "<timestamp>,<connection-info>,<log-entry> (epoch seconds, remote address and user agent); with "
        "show=groups <group id>"
    ),
    alternatives={204: NO_RECORDS},
    errors=(400, 401, 403, 404),
    description="show=groups (#45) is the model's vendor's only: 403 with X-Exosite-Vendor; 404 for an "
    "unknown serial number.",
)
async def serial_info(call: Call[VendorCaller, models.SerialPath, models.SerialQuery, None]) -> web.Response:
    serials, caller, path = call.core.provisioning.serials, call.principal, call.path
    if call.query.show == "groups":
        if caller.as_vendor is not None:
            raise Forbidden("X-Exosite-Vendor is not accepted with show=groups")
        return await _groups_of(call, "sn", path.sn)
    if call.query.show == "log":
        entries = await serials.log(caller.vendor, path.model, path.sn, as_vendor=caller.as_vendor)
        return csv_answer((int(e.ts), f"{e.remote} {e.agent}".strip(), e.entry) for e in entries)
    info = await serials.info(caller.vendor, path.model, path.sn, as_vendor=caller.as_vendor)
    return csv_answer([] if info is None else [(info.status, info.rid, info.extra)])


@api.post(
    "/manage/model/{model}/{sn}",
    "Make a client (#47), remap (#48), regenerate the CIK (#49) or disable (#50)",
    tag=TAG,
    auth=VENDOR_OR_SHARE,
    path_model=models.SerialPath,
    body=Form(
        models.ClientForm,
        "disable=true; or enable=true with owner=<rid> (make a client), with oldsn=<sn> (remap), or alone "
        "(regenerate the CIK).",
    ),
    status=205,
    answer=RESET,
    alternatives={200: csv_media("<ClientRID> (make a client)")},
    errors=(*WRITE, 409),
    description="Each enable sets the serial number enabled for activation for provisioning.enable_expiry "
    "seconds; regenerate, remap and disable revoke the current CIK at once.",
)
async def client_lifecycle(
    call: Call[VendorCaller, models.SerialPath, None, models.ClientForm],
) -> web.Response:
    form, serials, caller, path = call.body, call.core.provisioning.serials, call.principal, call.path
    vendor, model, sn, share = caller.vendor, path.model, path.sn, caller.as_vendor
    if form.disable == form.enable:
        raise Invalid("give enable=true or disable=true")
    if form.disable:
        await serials.disable(vendor, model, sn, as_vendor=share)
    elif form.owner is not None:
        return csv_answer([[await serials.make_client(vendor, model, sn, form.owner, as_vendor=share)]])
    elif form.oldsn is not None:
        await serials.remap(vendor, model, sn, form.oldsn, as_vendor=share)
    else:
        await serials.regenerate(vendor, model, sn, as_vendor=share)
    return reset()


@api.delete(
    "/manage/model/{model}/{sn}",
    "Remove a serial number (#51)",
    tag=TAG,
    auth=VENDOR,
    path_model=models.SerialPath,
    status=205,
    answer=RESET,
    errors=WRITE,
)
async def remove_serial(call: Call[VendorCaller, models.SerialPath, None, None]) -> web.Response:
    await call.core.provisioning.serials.remove_serials(
        call.principal.vendor, call.path.model, [call.path.sn]
    )
    return reset()


# ---- shares -------------------------------------------------------------------------------------
@api.get(
    "/manage/share/{model}/",
    "Vendors the model is shared with (#52)",
    tag=TAG,
    auth=VENDOR,
    path_model=models.ModelPath,
    answer=csv_media("<vendorname>"),
    alternatives={204: NO_RECORDS},
    errors=(400, 401, 403, 404),
)
async def list_shares(call: Call[VendorCaller, models.ModelPath, None, None]) -> web.Response:
    names = await call.core.provisioning.shares.list(call.principal.vendor, call.path.model)
    return csv_answer([name] for name in names)


@api.post(
    "/manage/share/{model}/",
    "Share the model with a vendor (#53), or stop (#54, delete=true)",
    tag=TAG,
    auth=VENDOR,
    path_model=models.ModelPath,
    body=Form(models.ShareForm, "vendor, with delete=true to stop sharing."),
    status=205,
    answer=RESET,
    errors=WRITE,
    description="Sharing again, or stopping a share that does not exist, is done already.",
)
async def share_or_unshare(
    call: Call[VendorCaller, models.ModelPath, None, models.ShareForm],
) -> web.Response:
    shares, vendor, model = call.core.provisioning.shares, call.principal.vendor, call.path.model
    if call.body.delete:
        await shares.remove(vendor, model, call.body.vendor)
    else:
        await shares.add(vendor, model, call.body.vendor)
    return reset()


@api.get(
    "/manage/share/{model}/{vendorname}",
    "Is the model shared with this vendor (#55)",
    tag=TAG,
    auth=VENDOR,
    path_model=models.SharePath,
    status=204,
    answer=Empty("No Content: the model is shared with the vendor."),
    errors=(400, 401, 403, 404),
    description="404 when it is not (the document gives no status for it, CATALOG 002 #13).",
)
async def share_status(call: Call[VendorCaller, models.SharePath, None, None]) -> web.Response:
    path = call.path
    if not await call.core.provisioning.shares.shared_with(
        call.principal.vendor, path.model, path.vendorname
    ):
        raise NotFound(f"model {path.model!r:.140} is not shared with {path.vendorname!r:.100}")
    return web.Response(status=204)


@api.delete(
    "/manage/share/{model}/{vendorname}",
    "Stop sharing the model with a vendor (#56)",
    tag=TAG,
    auth=VENDOR,
    path_model=models.SharePath,
    status=205,
    answer=RESET,
    errors=WRITE,
)
async def unshare(call: Call[VendorCaller, models.SharePath, None, None]) -> web.Response:
    await call.core.provisioning.shares.remove(call.principal.vendor, call.path.model, call.path.vendorname)
    return reset()


# ---- content ------------------------------------------------------------------------------------
BLOB = {"type": "string", "format": "binary"}
BLOB_HEADERS = {
    "ETag": {"description": "The blob's SHA-256 (strong), for If-Range", "schema": {"type": "string"}},
    "Last-Modified": {"schema": {"type": "string"}},
    "Accept-Ranges": {"schema": {"type": "string", "enum": ["bytes"]}},
}
DOWNLOAD = Media(OCTET, "The blob, with the Content-Type it was uploaded with.", BLOB, BLOB_HEADERS)
PARTIAL = Media(
    OCTET,
    "Partial Content: the range asked for (Range: bytes=X-Y, X-, -Y; If-Range with the ETag or a date).",
    BLOB,
    {**BLOB_HEADERS, "Content-Range": {"description": "bytes <first>-<last>/<total>", "schema": STRING}},
)
UNSATISFIABLE = ErrorDoc(
    416, "Range Not Satisfiable: it starts past the end (Content-Range: bytes */<size>)."
)
CINFO4 = "<content-type>,<byte-size>,<updated-timestamp>,<description>"


async def _pair(call: Call[VendorCaller, Any, Any, Any], error: type[DomainError]) -> None:
    """An invalid vendor/model pair answers `error`'s status where the document says so (400 on the
    lists and sn info, 403 on the downloads: CATALOG 002 #4), not the dialect's 404."""
    try:
        await call.core.provisioning.serials.model(call.principal.vendor, call.path.model)
    except NotFound as exc:
        raise error(str(exc)) from None


async def _groups_of(call: Call[VendorCaller, Any, Any, Any], type_: str, id_: str) -> web.Response:
    """The `show=groups` views (#13, #20, #45): the groups it is a direct member of, paginated."""
    names = await call.core.provisioning.groups.groups_of(
        call.principal.vendor, call.path.model, type_, id_, call.query.page()
    )
    return csv_answer([name] for name in names)


def _cinfo(info: ContentInfo, *, protected: bool) -> web.Response:
    row: list[object] = [info.content_type, info.size, info.updated, info.description]
    return csv_answer([[*row, str(info.protected).lower()] if protected else row])


@api.get(
    "/manage/content/{model}/",
    "List content (#5), or the content a serial number may have (#6, sn=)",
    tag=TAG,
    auth=VENDOR,
    path_model=models.ModelPath,
    query=models.ContentListQuery,
    answer=csv_media("<id>"),
    alternatives={204: NO_RECORDS},
    errors=(400, 401, 403, 404),
    description="400: the vendor/model pair is invalid (#5, #6); 404: no such serial number (sn=).",
)
async def list_content(
    call: Call[VendorCaller, models.ModelPath, models.ContentListQuery, None],
) -> web.Response:
    await _pair(call, Invalid)
    content, vendor, model = call.core.provisioning.content, call.principal.vendor, call.path.model
    sn = call.query.sn
    ids = await content.list(vendor, model) if sn is None else await content.authorized(vendor, model, sn)
    return csv_answer([i] for i in ids)


@api.post(
    "/manage/content/{model}/",
    "Create a content entity (#7), or delete one (#8, delete=true)",
    tag=TAG,
    auth=VENDOR,
    path_model=models.ModelPath,
    body=Form(
        models.ContentForm, "id and description (protected=true: only for its groups), or delete=true and id."
    ),
    status=205,
    answer=RESET,
    errors=(*WRITE, 409),
    description="Without a blob until the first upload. Protected content is for the serial numbers sharing "
    "a group with it (CATALOG 002 #7); deleting a missing one is done already.",
)
async def create_or_delete_content(
    call: Call[VendorCaller, models.ModelPath, None, models.ContentForm],
) -> web.Response:
    form, content, vendor = call.body, call.core.provisioning.content, call.principal.vendor
    if form.delete:
        await content.delete(vendor, call.path.model, form.id)
    else:
        await content.create(vendor, call.path.model, form.id, _described(form, "content"), form.protected)
    return reset()


def _described(form: models.ContentForm | models.GroupForm, what: str) -> str:
    """A create's description: optional in the form (a delete has none), required by the document."""
    if form.description is None:
        raise Invalid(f"description is required to create {what}")
    return form.description


@api.get(
    "/manage/content/{model}/{id}",
    "Content information (#9, #11 with sn=), its groups (#13, show=groups) or its blob (#10, #12: "
    "download=true)",
    tag=TAG,
    auth=VENDOR,
    path_model=models.ContentPath,
    query=models.ContentQuery,
    answer=Media(
        CSV,
        f"CSV (RFC 4180): {CINFO4},<protected> (#9), without <protected> with sn= (#11); <group id> per "
        "line with show=groups (#13); with download=true the blob, with the Content-Type it was uploaded "
        "with.",
        STRING,
        BLOB_HEADERS,
        {OCTET: BLOB},
    ),
    alternatives={204: NO_RECORDS, 206: PARTIAL},
    errors=(400, 401, 403, 404, UNSATISFIABLE),
    description="An invalid vendor/model pair answers 400 with sn= (#11), 403 with download=true (#10, #12); "
    "404: no such content, or not for that serial number, or no blob uploaded yet. show=groups (#13) "
    "answers 204 for content in no group.",
)
async def content_info_or_download(
    call: Call[VendorCaller, models.ContentPath, models.ContentQuery, None],
) -> web.Response:
    content, vendor, path, query = (
        call.core.provisioning.content,
        call.principal.vendor,
        call.path,
        call.query,
    )
    if query.show == "groups":
        return await _groups_of(call, "content", path.id)
    if query.download:
        await _pair(call, Forbidden)
        return BlobResponse(await content.download(vendor, path.model, path.id, sn=query.sn))
    if query.sn is not None:
        await _pair(call, Invalid)
    info = await content.info(vendor, path.model, path.id, sn=query.sn)
    return _cinfo(info, protected=query.sn is None)


@api.post(
    "/manage/content/{model}/{id}",
    "Upload the blob (#14)",
    tag=TAG,
    auth=VENDOR,
    path_model=models.ContentPath,
    body=RawBody(
        "The blob; its Content-Type (any, application/octet-stream when absent) is stored and answered on "
        "download. At most provisioning.max_content_size bytes.",
        {OCTET: BLOB},
        streamed=True,
    ),
    status=205,
    answer=RESET,
    errors=(*WRITE, 413),
    description="Replaces the entity's blob (CATALOG 002 #9: overwrite); 404 for an entity not created.",
)
async def upload_content(call: Call[VendorCaller, models.ContentPath, None, Stream]) -> web.Response:
    limit = call.core.cfg.provisioning.max_content_size
    length = call.request.content_length
    if length is not None and length > limit:  # refused before a byte is read
        raise TooLarge(f"the content is larger than provisioning.max_content_size ({limit} bytes)")
    content_type = call.request.headers.get(hdrs.CONTENT_TYPE, OCTET)
    await call.core.provisioning.content.upload(
        call.principal.vendor, call.path.model, call.path.id, content_type, call.body.chunks
    )
    return reset()


@api.delete(
    "/manage/content/{model}/{id}",
    "Delete a content entity (#15)",
    tag=TAG,
    auth=VENDOR,
    path_model=models.ContentPath,
    status=205,
    answer=RESET,
    errors=WRITE,
    description="With its blob and group memberships; a missing one is deleted already.",
)
async def delete_content(call: Call[VendorCaller, models.ContentPath, None, None]) -> web.Response:
    await call.core.provisioning.content.delete(call.principal.vendor, call.path.model, call.path.id)
    return reset()


# ---- the device's download ----------------------------------------------------------------------
@api.get(
    "/download",
    "The device's content: list (#2), a blob (#3, id=) or its information (#4, id= and info=true)",
    tag=TAG,
    auth=DEVICE,
    query=models.DownloadQuery,
    answer=Media(
        CSV,
        f"CSV (RFC 4180): <id> per line (#2); {CINFO4} (#4); with id= alone the blob (#3).",
        STRING,
        BLOB_HEADERS,
        {OCTET: BLOB},
    ),
    alternatives={204: NO_RECORDS, 206: PARTIAL},
    errors=(400, 401, 403, 404, UNSATISFIABLE),
    description="vendor and model must be the device's: 403 otherwise on the list and the blob (#2, #3), "
    "400 on the information (#4). Protected content is for the serial numbers sharing a group with it; "
    "content the device may not have answers 404 as a missing one does.",
)
async def device_download(call: Call[str, None, models.DownloadQuery, None]) -> web.Response:
    content, cik, query = call.core.provisioning.content, call.principal, call.query
    if query.id is None:
        return csv_answer([i] for i in await content.device_content(cik, query.vendor, query.model))
    if not query.info:
        return BlobResponse(await content.device_download(cik, query.vendor, query.model, query.id))
    try:
        info = await content.device_info(cik, query.vendor, query.model, query.id)
    except Forbidden as exc:
        raise Invalid(str(exc)) from None  # the document's 400 for the information (#4)
    return _cinfo(info, protected=False)


# ---- the device's certificate (ours) -------------------------------------------------------------
PEM = "application/x-pem-file"


@api.post(
    "/certificate",
    "A certificate for the device's own key, for MQTT/TLS (ours)",
    tag=TAG,
    auth=DEVICE,
    body=RawBody(
        "A PEM certificate signing request (RSA of at least 2048 bits, or EC P-256 / P-384); its subject "
        "is not read: the certificate names the device's thing.",
        {PEM: STRING, TEXT: STRING},
    ),
    answer=Media(PEM, "The thing's certificate, then the CA's (PEM): the chain for MQTT/TLS.", STRING),
    errors=(400, 401, 413),
    description="Beyond the document: a device that activated with its CIK moves to MQTT/TLS as the same thing "
    "without the bridge ever holding its private key. The certificate's common name is the thing id; a "
    "certificate issued before is void from now on, and so is this one when the CIK is taken away "
    "(regenerated, remapped, disabled, removed).",
)
async def device_certificate(call: Call[str, None, None, bytes]) -> web.Response:
    try:
        csr = call.body.decode("ascii")
    except UnicodeDecodeError:
        raise Invalid("the body must be a PEM certificate signing request") from None
    core = call.core
    chain = await core.things.certify(await core.provisioning.serials.identify_cik(call.principal), csr)
    return text_answer(chain, PEM)


# ---- groups -------------------------------------------------------------------------------------
MEMBERS = (
    "<type>,<memberid>,<expire>,<description> (type sn, content or group; expire epoch seconds, 0 = never)"
)


@api.get(
    "/manage/group/{model}/",
    "List groups (#16)",
    tag=TAG,
    auth=VENDOR,
    path_model=models.ModelPath,
    query=models.Paged,
    answer=csv_media("<group id>,<description>"),
    alternatives={204: NO_RECORDS},
    errors=(400, 401, 403, 404),
)
async def list_groups(call: Call[VendorCaller, models.ModelPath, models.Paged, None]) -> web.Response:
    rows = await call.core.provisioning.groups.list(call.principal.vendor, call.path.model, call.query.page())
    return csv_answer(rows)


@api.post(
    "/manage/group/{model}/",
    "Create a group (#17), or delete one (#18, delete=true)",
    tag=TAG,
    auth=VENDOR,
    path_model=models.ModelPath,
    body=Form(models.GroupForm, "id and description, or delete=true and id."),
    status=205,
    answer=RESET,
    errors=(*WRITE, 409),
    description="Deleting a missing group is done already; its memberships go with it.",
)
async def create_or_delete_group(
    call: Call[VendorCaller, models.ModelPath, None, models.GroupForm],
) -> web.Response:
    form, groups, vendor = call.body, call.core.provisioning.groups, call.principal.vendor
    if form.delete:
        await groups.delete(vendor, call.path.model, form.id)
    else:
        await groups.create(vendor, call.path.model, form.id, _described(form, "a group"))
    return reset()


@api.post(
    "/manage/group/{model}/{id}/",
    "Add members (#26 form, #27 text/csv) or remove them (#28, delete=true)",
    tag=TAG,
    auth=VENDOR,
    path_model=models.GroupPath,
    body=Form(
        models.MembersForm,
        "A form: type (sn, content, group) with id or id[], expire (epoch seconds, 0 = never) and "
        "description, with delete=true to remove them; or text/csv lines <type>,<memberid>,<expire>"
        "[,<description>] to add, all or none in one transaction.",
        {CSV: CSV_LINES},
    ),
    status=205,
    answer=RESET,
    errors=(*WRITE, 409, 413),
    description="Adding a member again updates its expiry and description; a group inside itself "
    "(directly or nested) is a 409. A protected content is for the serial numbers sharing a group with it.",
)
async def add_or_remove_members(
    call: Call[VendorCaller, models.GroupPath, None, models.MembersForm | Stream],
) -> web.Response:
    groups, vendor, model, group, body = (
        call.core.provisioning.groups,
        call.principal.vendor,
        call.path.model,
        call.path.id,
        call.body,
    )
    if isinstance(body, Stream):
        await groups.add_csv(vendor, model, group, body.chunks)
        return reset()
    if (body.id is None) == (body.ids is None):
        raise Invalid("give either id or id[]")
    ids = [body.id] if body.id is not None else body.ids or []
    kind = member_type(body.type)
    if body.delete:
        await groups.remove(vendor, model, group, kind, ids)
    else:
        await groups.add(vendor, model, group, kind, ids, expire(body.expire), body.description)
    return reset()


@api.get(
    "/manage/group/{model}/{id}",
    "Group information (#19) or the groups it is a member of (#20, show=groups)",
    tag=TAG,
    auth=VENDOR,
    path_model=models.GroupPath,
    query=models.GroupQuery,
    answer=csv_media("<description>,<count> (members not expired); with show=groups <group id>"),
    alternatives={204: NO_RECORDS},
    errors=(400, 401, 403, 404),
    description="404: no such group. 204 with show=groups: not a member of any other group.",
)
async def group_info(call: Call[VendorCaller, models.GroupPath, models.GroupQuery, None]) -> web.Response:
    groups, vendor, path = call.core.provisioning.groups, call.principal.vendor, call.path
    if call.query.show == "groups":
        return await _groups_of(call, "group", path.id)
    info = await groups.info(vendor, path.model, path.id)
    return csv_answer([(info.description, info.count)])


@api.delete(
    "/manage/group/{model}/{id}",
    "Delete a group (#21)",
    tag=TAG,
    auth=VENDOR,
    path_model=models.GroupPath,
    status=205,
    answer=RESET,
    errors=WRITE,
    description="With its memberships (as a group and as a member); a missing group is deleted already.",
)
async def delete_group(call: Call[VendorCaller, models.GroupPath, None, None]) -> web.Response:
    await call.core.provisioning.groups.delete(call.principal.vendor, call.path.model, call.path.id)
    return reset()


@api.get(
    "/manage/group/{model}/{id}/",
    "Members of a group (#22), of a type (#23, type=), with a member id (#24, id=) or one member (#25)",
    tag=TAG,
    auth=VENDOR,
    path_model=models.GroupPath,
    query=models.MembersQuery,
    answer=csv_media(MEMBERS),
    alternatives={204: NO_RECORDS},
    errors=(400, 401, 403, 404),
    description="In the order they were added; expired members are absent. 404: no such group; 400: a type "
    "other than sn, content or group.",
)
async def list_members(call: Call[VendorCaller, models.GroupPath, models.MembersQuery, None]) -> web.Response:
    query, path = call.query, call.path
    members = await call.core.provisioning.groups.members(
        call.principal.vendor, path.model, path.id, query.page(), type=query.type, id=query.id
    )
    return csv_answer((m.type, m.id, m.expire, m.description) for m in members)


@api.delete(
    "/manage/group/{model}/{id}/",
    "Remove members (#29)",
    tag=TAG,
    auth=VENDOR,
    path_model=models.GroupPath,
    body=Form(
        None,
        "text/csv lines <type>,<memberid> (DELETE, so that POST text/csv means add).",
        {CSV: CSV_LINES},
    ),
    status=205,
    answer=RESET,
    errors=(*WRITE, 413),
    description="Members not in the group are gone already; all or none in one transaction.",
)
async def remove_members_csv(call: Call[VendorCaller, models.GroupPath, None, Stream]) -> web.Response:
    path = call.path
    await call.core.provisioning.groups.remove_csv(
        call.principal.vendor, path.model, path.id, call.body.chunks
    )
    return reset()
