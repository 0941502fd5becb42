"""The request shapes of the Provisioning v1.1 document: path parameters, query strings and form
bodies (field names as the document spells them: `name[]` is an array). Values are checked by
the core (identifiers, option names); the models check presence and type."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from bridge.core.provisioning.common import _KEY, Page
from bridge.http.common.models import Model, Name, OpenModel

Text = Annotated[str, Meta(max_length=1024)]
KEY_RULE = "1-128 characters, no '/' or control characters"
# Path segments: the core's rule for model names and serial numbers, as a pattern (JSON Schema
# patterns search, so anchored). Form fields are checked by the core, which says it in words.
Segment = Annotated[str, Meta(pattern=f"^{_KEY.pattern}$", description=KEY_RULE)]
Key = Annotated[str, Meta(description=KEY_RULE)]
Flag = Annotated[bool, Meta(description="true")]
Offset = Annotated[int, Meta(ge=0, le=999_999_999, description="records to skip (default 0)")]
Limit = Annotated[
    int, Meta(ge=0, le=999_999_999, description="records to answer, clamped to 5..1000 (default 5)")
]


# ---- paths --------------------------------------------------------------------------------------
class ModelPath(Model):
    model: Segment


class SerialPath(Model):
    model: Segment
    sn: Segment


class SharePath(Model):
    model: Segment
    vendorname: Name


# ---- queries ------------------------------------------------------------------------------------
class ModelsQuery(OpenModel):
    show: Annotated[
        Literal["shared"] | None, Meta(description="shared: the models shared with the caller")
    ] = None


class Paged(OpenModel):
    """`offset` and `limit` (CATALOG 002 pagination: defaults 0 and 5, the limit clamped to 5..1000)."""

    offset: Offset | None = None
    limit: Limit | None = None

    def page(self) -> Page:
        return Page.parse(*(None if v is None else str(v) for v in (self.offset, self.limit)))


class SerialsQuery(Paged):
    shared: Annotated[str | None, Meta(description="only the serial numbers this vendor enabled")] = None


class SerialQuery(Paged):
    show: Annotated[
        Literal["log", "groups"] | None,
        Meta(description="log: the activation log; groups: the groups it is a direct member of"),
    ] = None


# ---- form bodies --------------------------------------------------------------------------------
class ActivateForm(Model):
    vendor: Key
    model: Key
    sn: Key


class ModelForm(Model):
    """POST model/: create (`model`, `rid`, `options[]`), or with `delete=true` delete `model`."""

    model: Key
    rid: Key | None = None
    options: list[Literal["noaliases", "nocomments", "nohistorical"]] = msgspec.field(
        default_factory=list, name="options[]"
    )
    delete: Flag = False


class ModelUpdate(Model):
    rid: Key
    options: list[Literal["noaliases", "nocomments", "nohistorical"]] = msgspec.field(
        default_factory=list, name="options[]"
    )


class SerialsForm(Model):
    """POST model/{model}/: add `sn` (with `extra`) or `sn[]`; with `delete=true` remove them."""

    sn: Key | None = None
    sns: list[Key] | None = msgspec.field(default=None, name="sn[]")
    extra: Text = ""
    delete: Flag = False


class ClientForm(Model):
    """POST model/{model}/{sn}: `disable=true`; `enable=true` with `owner` (make a client), with
    `oldsn` (remap), or alone (regenerate the CIK)."""

    enable: Flag = False
    disable: Flag = False
    owner: Key | None = None
    oldsn: Key | None = None


class ShareForm(Model):
    vendor: Key
    delete: Flag = False


# ---- content --------------------------------------------------------------------------------------
class ContentPath(Model):
    model: Segment
    id: Segment


class ContentListQuery(OpenModel):
    sn: Annotated[Key | None, Meta(description="only the content this serial number may have")] = None


class ContentQuery(Paged):
    show: Annotated[
        Literal["groups"] | None, Meta(description="groups: the groups it is a direct member of")
    ] = None
    download: Annotated[bool, Meta(description="true: the blob instead of its information")] = False
    sn: Annotated[Key | None, Meta(description="only if this serial number may have the content")] = None


class DownloadQuery(OpenModel):
    vendor: Key
    model: Key
    id: Annotated[
        Key | None, Meta(description="a content id: its blob (or with info=true its information)")
    ] = None
    info: Annotated[bool, Meta(description="true: the content's information instead of its blob")] = False


class ContentForm(Model):
    """POST content/{model}/: create `id` (`description`, `protected`), or with `delete=true` delete it."""

    id: Key
    description: Text | None = None
    protected: Flag = False
    delete: Flag = False


# ---- groups -------------------------------------------------------------------------------------
GroupPath = ContentPath  # {model}/{id}: the same segments, naming a group


class GroupForm(Model):
    """POST group/{model}/: create `id` (`description`), or with `delete=true` delete it."""

    id: Key
    description: Text | None = None
    delete: Flag = False


class MembersForm(Model):
    """POST group/{model}/{id}/: add `id` or `id[]` of one `type` (`expire`, `description`), or with
    `delete=true` remove them."""

    type: Annotated[str, Meta(description="sn, content or group")]
    id: Key | None = None
    ids: list[Key] | None = msgspec.field(default=None, name="id[]")
    expire: Annotated[str, Meta(description="epoch seconds, 0 = never (default)")] = "0"
    description: Text = ""
    delete: Flag = False


class GroupQuery(Paged):
    """GET group/{model}/{id}: its information, or with `show=groups` the groups it is a member of."""

    show: Annotated[
        Literal["groups"] | None, Meta(description="groups: the groups it is a direct member of")
    ] = None


class MembersQuery(Paged):
    """GET group/{model}/{id}/: its members, only of `type` and/or with member `id`."""

    type: Annotated[str | None, Meta(description="only members of this type: sn, content or group")] = None
    id: Annotated[Key | None, Meta(description="only members with this id")] = None
