"""Who may do what on NATS: one user per service, with only the subjects that service uses.

`SERVICE_ACCESS` is the single description; `authorization_config` renders it as the
`authorization {}` block of nats-server's config (the embedded server of `threadline up`, the
loopback cluster, the test fixture and, with passwords from the environment, the Kubernetes
ConfigMap `deploy/k8s/base/nats/auth.conf`). A service connects as itself
(`THREADLINE_NATS_USER`/`THREADLINE_NATS_PASSWORD`) and gets replies under its own inbox prefix,
so it cannot read another service's replies.

What a service may touch:
- the streams it publishes to, by subject; the durable consumers it owns (create, fetch, ack)
  and their partitions (`tl_partition_members`, `tl_partition_owners`);
- the KV buckets it reads (info, get, watch) and those it writes (`$KV.<bucket>.>`) — e.g. only
  `conversations` writes integrations, only `webhooks` reads webhook secrets;
- the request/reply services it calls and, if it serves some, its own endpoints (replying to
  a request it received is `allow_responses`);
- create/update of the four Threadline streams (every service ensures them at start);
- erasing from streams (purges, single deletes) for `conversations` only (privacy).

A subject or bucket a service starts using must be added here, or the server refuses it (the
bus logs "nats refused … see shared/natsauth.py").
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass

from shared import subjects
from shared.subjects import ALL_STREAMS, EVENTS, INBOUND, OUTBOUND, ConsumerSpec, StreamSpec

INBOX_PREFIX = "_INBOX"
ADMIN_USER = "admin"  # every permission: operators' tools, the launcher's cluster checks, tests


def inbox_prefix(user: str) -> str:
    """The inbox prefix of `user`'s connection (its replies arrive under it)."""
    return f"{INBOX_PREFIX}.{user}"


def kv_stream(bucket: str) -> str:
    """The JetStream stream behind a KV bucket."""
    return f"KV_{bucket}"


@dataclass(frozen=True)
class Access:
    """What one service does on NATS."""

    publish: tuple[str, ...] = ()  # stream subjects it publishes to, request subjects it calls
    subscribe: tuple[str, ...] = ()  # plain (core) subscriptions
    serves: tuple[str, ...] = ()  # its nats.micro endpoints
    consumers: tuple[ConsumerSpec, ...] = ()  # consumer groups (a durable per partition)
    kv_read: tuple[str, ...] = ()
    kv_write: tuple[str, ...] = ()
    # Streams it erases from: purges (retention, consumed copies) and single-message deletes.
    erases: tuple[StreamSpec, ...] = ()
    # Streams whose stored messages it reads back one by one to find what to erase
    # (`Bus.erase_published`: a deleted message's event).
    reads_back: tuple[StreamSpec, ...] = ()

    @property
    def buckets_written(self) -> tuple[str, ...]:
        """`kv_write`, plus the partition buckets of its consumer groups (`shared.partitions`)."""
        partitions = (subjects.PARTITION_MEMBERS_BUCKET, subjects.PARTITION_OWNERS_BUCKET)
        return (*self.kv_write, *(partitions if self.consumers else ()))


_CHANNELS = ("whatsapp", "messenger", "telegram", "twilio")


def _channel(channel: str) -> Access:
    return Access(publish=(subjects.channel_subjects("inbound", channel), subjects.channel_subjects("status", channel)),
                  consumers=(subjects.channel_outbound_consumer(channel),),
                  kv_read=(subjects.INTEGRATIONS_BUCKET,), kv_write=(subjects.WEBHOOKS_SEEN_BUCKET,))


# The internal requests the internet-facing SDK services make, exactly: none of them can delete a
# user, link or merge clients, or read another app's data through a subject it never needs.
_SDK_REQUESTS = (
    subjects.CONVERSATIONS_START, subjects.CONVERSATIONS_HISTORY, subjects.CONVERSATIONS_SDK_LINK,
    subjects.CONVERSATIONS_SDK_LOGIN, subjects.IDENTITY_RESOLVE, subjects.IDENTITY_DEVICE_REGISTER,
    subjects.IDENTITY_DEVICES_LIST, subjects.IDENTITY_DEVICE_DROP_TOKEN, subjects.HANDOFF_ISSUE,
    subjects.NOTIFICATIONS_OPTIN_START, subjects.NOTIFICATIONS_OPTIN_CONFIRM, subjects.NOTIFICATIONS_OPTIN_LIST,
    subjects.NOTIFICATIONS_OPTIN_STOP,
)

SERVICE_ACCESS: Mapping[str, Access] = {
    "identity": Access(serves=("identity.>",), kv_write=(subjects.ENDED_USERS_BUCKET,)),
    "conversations": Access(
        publish=("events.>", "outbound.>", "identity.>", "handoff.>", "notifications.>", subjects.DESK_API),
        serves=("conversations.>",),
        consumers=(subjects.CONVERSATIONS_INBOUND, subjects.CONVERSATIONS_STATUS),
        kv_read=(subjects.ENDED_USERS_BUCKET,),
        kv_write=(subjects.INTEGRATIONS_BUCKET, subjects.WEBHOOKS_BUCKET, subjects.APPS_BUCKET),
        erases=(EVENTS, INBOUND, OUTBOUND), reads_back=(EVENTS,)),
    "webhooks": Access(publish=(subjects.WEBHOOKS_ERASURES,), subscribe=(subjects.WEBHOOKS_ERASURES,),
                       consumers=(subjects.WEBHOOKS_EVENTS,),
                       kv_read=(subjects.WEBHOOKS_BUCKET, subjects.APPS_BUCKET)),
    "handoff": Access(serves=("handoff.>",), kv_read=(subjects.INTEGRATIONS_BUCKET,),
                      kv_write=(subjects.LINK_CODES_BUCKET,)),
    "notifications": Access(
        publish=("events.>", "outbound.>", "conversations.>", "identity.>", "handoff.>"),
        serves=("notifications.>",),
        consumers=(subjects.NOTIFICATIONS_EVENTS, subjects.NOTIFICATIONS_STATUS),
        kv_read=(subjects.APPS_BUCKET, subjects.INTEGRATIONS_BUCKET, subjects.SDK_PRESENCE_BUCKET)),
    "whatsapp": _channel("whatsapp"),
    "messenger": _channel("messenger"),
    "telegram": _channel("telegram"),
    "sms": _channel("twilio"),
    "email": dataclasses.replace(_channel("mailgun"),
                                 kv_write=(subjects.MAIL_THREADS_BUCKET, subjects.MAIL_LIMITS_BUCKET,
                                           subjects.WEBHOOKS_SEEN_BUCKET)),
    "web": Access(publish=(subjects.channel_subjects("inbound", "web"), *_SDK_REQUESTS),
                  subscribe=(subjects.EVENTS_ALL,),
                  kv_read=(subjects.INTEGRATIONS_BUCKET, subjects.ENDED_USERS_BUCKET),
                  kv_write=(subjects.SDK_PRESENCE_BUCKET, subjects.SDK_LIMITS_BUCKET)),
    "app": Access(
        publish=tuple(s for p in ("android", "ios") for s in (subjects.channel_subjects("inbound", p),
                                                              subjects.channel_subjects("status", p))) + _SDK_REQUESTS,
        subscribe=(subjects.EVENTS_ALL,),
        consumers=(subjects.channel_outbound_consumer("android"), subjects.channel_outbound_consumer("ios")),
        kv_read=(subjects.INTEGRATIONS_BUCKET, subjects.ENDED_USERS_BUCKET),
        kv_write=(subjects.SDK_PRESENCE_BUCKET, subjects.APP_DELIVERIES_BUCKET, subjects.SDK_LIMITS_BUCKET)),
    "desk": Access(
        publish=(subjects.CONVERSATIONS_DESK, subjects.CONVERSATIONS_HISTORY, subjects.CONVERSATIONS_PARTICIPANTS,
                 subjects.IDENTITY_USER_GET, subjects.IDENTITY_CLIENTS_LIST, subjects.HANDOFF_ISSUE,
                 subjects.NOTIFICATIONS_OPTIN_LIST, subjects.IDENTITY_USERS_SIMILAR, subjects.IDENTITY_USERS_SEARCH,
                 f"{subjects.DESK_UPDATES_PREFIX}.*"),
        subscribe=(f"{subjects.DESK_UPDATES_PREFIX}.*",),
        serves=(subjects.DESK_API,),
        consumers=(subjects.DESK_EVENTS,),
        kv_read=(subjects.APPS_BUCKET, subjects.INTEGRATIONS_BUCKET, subjects.WEBHOOKS_SEEN_BUCKET),
        kv_write=(subjects.DESK_LOGIN_BUCKET,)),
    "sandbox": Access(kv_read=(subjects.INTEGRATIONS_BUCKET,)),
}

# Users of a deployment: every service plus the admin.
USERS: tuple[str, ...] = (*SERVICE_ACCESS, ADMIN_USER)


def _js(api: str) -> str:
    return f"$JS.API.{api}"


def permissions(user: str) -> dict[str, object] | None:
    """nats-server `permissions` of `user` (None: the admin, who may do anything)."""
    if user == ADMIN_USER:
        return None
    access = SERVICE_ACCESS[user]
    publish: list[str] = [*access.publish, _js("INFO")]
    for stream in ALL_STREAMS:  # Bus.ensure_streams
        publish += [_js(f"STREAM.{verb}.{stream.name}") for verb in ("CREATE", "UPDATE", "INFO")]
    for spec in access.consumers:
        stream = spec.stream
        for durable in spec.durables:
            publish += [_js(f"CONSUMER.INFO.{stream.name}.{durable}"),
                        _js(f"CONSUMER.DURABLE.CREATE.{stream.name}.{durable}"),
                        _js(f"CONSUMER.CREATE.{stream.name}.{durable}"),
                        _js(f"CONSUMER.CREATE.{stream.name}.{durable}.>"),
                        _js(f"CONSUMER.MSG.NEXT.{stream.name}.{durable}"),
                        # Recreated at its ack floor after a holder died; the pre-partitioning
                        # durable is removed once drained.
                        _js(f"CONSUMER.DELETE.{stream.name}.{durable}"),
                        f"$JS.ACK.{stream.name}.{durable}.>"]
    for stream in access.erases:  # Bus.purge_subject, purge_consumed, delete_message
        publish += [_js(f"STREAM.PURGE.{stream.name}"), _js(f"STREAM.MSG.DELETE.{stream.name}"),
                    _js(f"CONSUMER.LIST.{stream.name}")]
    publish += [_js(f"STREAM.MSG.GET.{stream.name}") for stream in access.reads_back]
    kv_write = access.buckets_written
    for bucket in dict.fromkeys((*access.kv_read, *kv_write)):
        stream_name = kv_stream(bucket)
        publish += [_js(f"STREAM.INFO.{stream_name}"), _js(f"STREAM.CREATE.{stream_name}"),
                    _js(f"DIRECT.GET.{stream_name}"), _js(f"DIRECT.GET.{stream_name}.>"),
                    _js(f"STREAM.MSG.GET.{stream_name}"),
                    _js(f"CONSUMER.CREATE.{stream_name}"), _js(f"CONSUMER.CREATE.{stream_name}.>"),
                    _js(f"CONSUMER.INFO.{stream_name}.>"), _js(f"CONSUMER.DELETE.{stream_name}.>"),
                    f"$JS.FC.{stream_name}.>"]
    for bucket in kv_write:
        publish.append(f"$KV.{bucket}.>")
    subscribe: list[str] = [f"{inbox_prefix(user)}.>", *access.subscribe]
    if access.serves:
        subscribe += [*access.serves, "$SRV.>"]
        publish.append("$SRV.>")  # Bus.serve pings its own endpoints
    out: dict[str, object] = {"publish": {"allow": publish}, "subscribe": {"allow": subscribe}}
    if access.serves:
        out["allow_responses"] = True
    return out


def _value(text: str) -> str:
    # "$NAME" is a reference nats-server resolves from its environment; anything else a literal.
    return text if text.startswith("$") else json.dumps(text)


def authorization_config(passwords: Mapping[str, str]) -> str:
    """The `authorization {}` block for these users: a literal password each, or `$VARIABLE`
    (nats-server reads it from its environment). Users not in `passwords` cannot connect."""
    lines = ["# Generated from shared/natsauth.py (SERVICE_ACCESS): one user per service, each allowed",
             "# only the subjects it uses. Regenerate: python -m shared.natsauth > auth.conf",
             "authorization {", "  users: ["]
    for user in USERS:
        if user not in passwords:
            continue
        lines += ["    {", f"      user: {json.dumps(user)}", f"      password: {_value(passwords[user])}"]
        perms = permissions(user)
        if perms is not None:
            body = json.dumps(perms, indent=2).splitlines()
            lines.append(f"      permissions: {body[0]}")
            lines += [f"      {line}" for line in body[1:]]
        lines.append("    }")
    lines += ["  ]", "}", ""]
    return "\n".join(lines)


def password_env(user: str) -> str:
    """The environment variable the Kubernetes NATS pods read `user`'s password from."""
    return f"NATS_PASSWORD_{user.upper()}"


def kubernetes_auth_config() -> str:
    """The `auth.conf` of the Kubernetes NATS ConfigMap: passwords from the pods' environment
    (`NATS_PASSWORD_<USER>`, from Secret `threadline-nats`)."""
    return authorization_config({user: "$" + password_env(user) for user in USERS})


if __name__ == "__main__":
    print(kubernetes_auth_config(), end="")
