"""Identity logic on decoded requests: resolve channel identities, manage users and clients."""

from __future__ import annotations

import logging
from typing import Any

from services.identity.login import login_user
from services.identity.store import ChannelIdentity, Conflict, IdentityStore, UserGone
from shared.messages import identity as msgs
from shared.sunco import Client, User

log = logging.getLogger(__name__)


class IdentityHandlers:
    """Answers identity requests. Resolutions are cached: the same channel identity always maps
    to the same client, so a hit needs no I/O (the cache is dropped for a user on delete)."""

    def __init__(self, store: IdentityStore, cache_size: int = 100_000) -> None:
        self.store = store
        self.cache_size = cache_size
        self._resolved: dict[tuple[str, str, str], tuple[User, Client]] = {}

    async def handle(self, request: msgs.IdentityUnion) -> msgs.IdentityMessage:
        """Dispatch one request to its handler."""
        if isinstance(request, msgs.ResolveClient):
            return await self.resolve(request)
        if isinstance(request, msgs.ResolveClients):
            return await self.resolve_batch(request)
        if isinstance(request, msgs.CreateUser):
            return await self.create_user(request)
        if isinstance(request, msgs.GetUser):
            return await self.get_user(request)
        if isinstance(request, msgs.UpdateUser):
            return await self.update_user(request)
        if isinstance(request, msgs.DeleteUser):
            return await self.delete_user(request)
        if isinstance(request, msgs.DeletePersonalInformation):
            return await self.delete_personal_information(request)
        if isinstance(request, msgs.ListClients):
            return await self.list_clients(request)
        if isinstance(request, msgs.SetClientStatus):
            return await self.set_client_status(request)
        if isinstance(request, msgs.RegisterDevice):
            return await self.register_device(request)
        if isinstance(request, msgs.ListDevices):
            return await self.list_devices(request)
        if isinstance(request, msgs.DropPushToken):
            return await self.drop_push_token(request)
        if isinstance(request, msgs.LinkClient):
            return await self.link_client(request)
        if isinstance(request, msgs.AttachPhoneClient):
            return await self.attach_phone_client(request)
        if isinstance(request, msgs.RemoveClient):
            return await self.remove_client(request)
        if isinstance(request, msgs.LoginUser):
            return await login_user(self.store, self.forget_user, request)
        if isinstance(request, msgs.ListMerges):
            return msgs.MergesReply(merges=await self.store.list_merges(request.app_id, request.user_id))
        if isinstance(request, msgs.SearchUsers):
            return msgs.UserIds(user_ids=await self.store.search_users(request.app_id, request.query,
                                                                       max(1, min(request.limit, 200))))
        if isinstance(request, msgs.FindSimilarUsers):
            return msgs.SimilarUsers(users=await self.store.similar_users(request.app_id, request.user_id))
        return msgs.IdentityError(status=400, code="bad_request", title=f"Unexpected request {type(request).__name__}")

    async def resolve(self, req: msgs.ResolveClient) -> msgs.IdentityMessage:
        [result] = await self.resolve_many([req])
        return result

    async def resolve_batch(self, req: msgs.ResolveClients) -> msgs.IdentityMessage:
        return msgs.ResolvedBatch(results=await self.resolve_many(req.requests))

    async def resolve_many(self, requests: list[msgs.ResolveClient]) -> list[msgs.Resolved | msgs.IdentityError]:
        """Each request's user and client, in order: cached ones without I/O, the others found or
        created in one transaction."""
        results: list[msgs.Resolved | msgs.IdentityError | None] = []
        misses: list[int] = []
        for req in requests:
            cached = self._resolved.get((req.app_id, req.integration_id, req.channel_user_id))
            results.append(None if cached is None else msgs.Resolved(user=cached[0], client=cached[1]))
            if cached is None:
                misses.append(len(results) - 1)
        if misses:
            resolutions = await self.store.resolve_clients(
                [ChannelIdentity(requests[i], _wa_id(requests[i])) for i in misses])
            for i, resolution in zip(misses, resolutions, strict=True):
                if resolution is None:
                    results[i] = _not_found()
                    continue
                req = requests[i]
                if len(self._resolved) >= self.cache_size:
                    self._resolved.clear()
                self._resolved[(req.app_id, req.integration_id, req.channel_user_id)] = (
                    resolution.user, resolution.client)
                results[i] = msgs.Resolved(user=resolution.user, client=resolution.client,
                                           user_created=resolution.user_created,
                                           client_created=resolution.client_created)
        return [result for result in results if result is not None]

    async def create_user(self, req: msgs.CreateUser) -> msgs.IdentityMessage:
        try:
            user = await self.store.create_user(req.app_id, req.external_id, req.profile, req.metadata,
                                                req.signed_up_at)
        except Conflict as exc:
            return msgs.IdentityError(status=409, code="conflict", title=str(exc))
        return msgs.UserReply(user=user)

    async def get_user(self, req: msgs.GetUser) -> msgs.IdentityMessage:
        user = await self.store.find_user(req.app_id, req.user_id_or_external_id)
        if user is None:
            return _not_found()
        return msgs.UserReply(user=user)

    async def update_user(self, req: msgs.UpdateUser) -> msgs.IdentityMessage:
        user = await self.store.find_user(req.app_id, req.user_id_or_external_id)
        if user is None:
            return _not_found()
        try:
            updated = await self.store.update_user(req.app_id, user, req.external_id, req.profile, req.metadata)
        except Conflict as exc:
            return msgs.IdentityError(status=409, code="conflict", title=str(exc))
        self.forget_user(user.id)
        return msgs.UserReply(user=updated)

    async def delete_user(self, req: msgs.DeleteUser) -> msgs.IdentityMessage:
        user = await self.store.find_user(req.app_id, req.user_id_or_external_id)
        if user is None:
            return _not_found()
        client_ids = await self.store.delete_user(req.app_id, user.id)
        self.forget_user(user.id)
        return msgs.Deleted(user_id=user.id, client_ids=client_ids, external_id=user.external_id,
                            authenticated=user.authenticated)

    async def delete_personal_information(self, req: msgs.DeletePersonalInformation) -> msgs.IdentityMessage:
        user = await self.store.find_user(req.app_id, req.user_id_or_external_id)
        if user is None:
            return _not_found()
        scrubbed = await self.store.delete_personal_information(req.app_id, user.id)
        self.forget_user(user.id)
        return _not_found() if scrubbed is None else msgs.UserReply(user=scrubbed)

    async def list_clients(self, req: msgs.ListClients) -> msgs.IdentityMessage:
        user = await self.store.find_user(req.app_id, req.user_id_or_external_id)
        if user is None:
            return _not_found()
        return msgs.ClientsReply(user=user, clients=await self.store.list_clients(req.app_id, user.id))

    async def set_client_status(self, req: msgs.SetClientStatus) -> msgs.IdentityMessage:
        found = await self.store.set_client_status(req.app_id, req.client_id, req.status)
        if found is None:
            return msgs.IdentityError(status=404, code="client_not_found", title="Client not found")
        user, client = found
        self.forget_user(user.id)
        return msgs.ClientReply(user=user, client=client)

    async def register_device(self, req: msgs.RegisterDevice) -> msgs.IdentityMessage:
        if not req.guid or len(req.guid) > 128:
            return msgs.IdentityError(status=400, code="bad_request", title="device guid must be 1-128 characters")
        if req.push_notification_token is not None and len(req.push_notification_token) > 4096:
            return msgs.IdentityError(status=400, code="bad_request", title="pushNotificationToken is too long")
        device = await self.store.register_device(req)
        if device is None:
            return msgs.IdentityError(status=404, code="client_not_found", title="Client not found")
        return msgs.DeviceReply(device=device)

    async def list_devices(self, req: msgs.ListDevices) -> msgs.IdentityMessage:
        user = await self.store.find_user(req.app_id, req.user_id_or_external_id)
        if user is None:
            return _not_found()
        return msgs.DevicesReply(user=user, devices=await self.store.list_devices(req.app_id, user.id))

    async def drop_push_token(self, req: msgs.DropPushToken) -> msgs.IdentityMessage:
        device = await self.store.drop_push_token(req.app_id, req.device_id, req.push_notification_token)
        if device is None:
            return msgs.IdentityError(status=404, code="device_not_found", title="Device not found")
        return msgs.DeviceReply(device=device)

    async def link_client(self, req: msgs.LinkClient) -> msgs.IdentityMessage:
        target = await self.store.find_user(req.app_id, req.user_id)
        if target is None:
            return _not_found()
        # Found however the channel knows it (a WhatsApp number linked by phone is the same client
        # as its BSUID), so the rules below see the identity's real owner.
        as_resolve = msgs.ResolveClient(
            app_id=req.app_id, integration_id=req.integration_id, client_type=req.client_type,
            channel_user_id=req.channel_user_id, display_name=req.display_name, avatar_url=req.avatar_url,
            info=req.info, raw=req.raw, user_id=target.id)
        [resolution] = await self.store.resolve_clients([ChannelIdentity(as_resolve, _wa_id(req))])
        if resolution is None:  # the user was deleted meanwhile
            return _not_found()
        owner, client = resolution.user, resolution.client
        if resolution.client_created:
            self.forget_user(target.id)
            return msgs.ClientLinked(user=owner, client=client, client_created=True)
        if owner.id == target.id:
            return msgs.ClientLinked(user=owner, client=client)
        if owner.external_id:
            # A known person's account is never joined on a link: the other side would have to be
            # identified as the same person, and then it would be this user already.
            log.warning("link refused: client %s belongs to an identified user", client.id)
            return msgs.IdentityError(
                status=409, code="link_refused",
                title="This channel identity belongs to an identified user, who is never merged by a link")
        if not req.allow_merge:
            owner_clients = await self.store.list_clients(req.app_id, owner.id)
            return msgs.ClientOwnedElsewhere(owner=owner, client=client, owner_client_count=len(owner_clients))
        try:
            merged = await self.store.merge_users(req.app_id, surviving=target, discarded=owner, reason=req.reason)
        except UserGone:
            return _not_found()
        self.forget_user(owner.id)
        self.forget_user(target.id)
        survivor = await self.store.find_user(req.app_id, target.id)
        moved = await self.store.find_client(req.app_id, req.integration_id, req.channel_user_id)
        assert survivor is not None and moved is not None
        return msgs.ClientLinked(user=survivor, client=moved[1], merge=merged, discarded_user=owner)

    async def attach_phone_client(self, req: msgs.AttachPhoneClient) -> msgs.IdentityMessage:
        target = await self.store.find_user(req.app_id, req.user_id)
        if target is None:
            return _not_found()
        key = msgs.phone_client_key(req.client_type, req.phone_number)
        found = await self.store.find_client(req.app_id, req.integration_id, key)
        if found is None:
            info: dict[str, Any]
            if req.client_type == "mailgun":
                info = {"email": key}
            else:
                info = {"phoneNumber": f"+{key.lstrip('+')}"}
                info["wa_id" if req.client_type == "whatsapp" else "phone_number"] = key
            user, client, _user_created, created = await self.store.create_client(
                app_id=req.app_id, integration_id=req.integration_id, client_type=req.client_type,
                channel_user_id=key, display_name=None, avatar_url=None, info=info, raw={}, user_id=target.id,
                status=req.status)
            if created:
                await self.store.set_proven_by(req.app_id, client.id, req.proven_by_client_id)
                self.forget_user(target.id)
                return msgs.PhoneClientAttached(user=user, client=client, client_created=True)
            found = (user, client)  # a message from the number created it meanwhile
        owner, client = found
        # The user's own active client has nothing left to confirm: it stays active.
        status = "active" if owner.id == target.id and client.status == "active" else req.status
        await self.store.attach_client(req.app_id, client.id, target.id, status)
        await self.store.set_proven_by(req.app_id, client.id, req.proven_by_client_id)
        self.forget_user(owner.id)
        self.forget_user(target.id)
        moved = await self.store.find_client(req.app_id, req.integration_id, key)
        assert moved is not None
        return msgs.PhoneClientAttached(user=moved[0], client=moved[1],
                                        previous_user=None if owner.id == target.id else owner)

    async def remove_client(self, req: msgs.RemoveClient) -> msgs.IdentityMessage:
        user = await self.store.find_user(req.app_id, req.user_id_or_external_id)
        if user is None:
            return _not_found()
        client = await self.store.remove_client(req.app_id, user.id, req.client_id)
        if client is None:
            return msgs.IdentityError(status=404, code="client_not_found", title="Client not found")
        self.forget_user(user.id)
        return msgs.ClientReply(user=user, client=client)

    def forget_user(self, user_id: str) -> None:
        """Drop the resolver cache's entries of `user_id` (it was merged, moved or changed)."""
        for key in [k for k, (u, _c) in self._resolved.items() if u.id == user_id]:
            del self._resolved[key]


def _wa_id(req: msgs.ResolveClient | msgs.LinkClient) -> str | None:
    """The sender's wa_id when a WhatsApp message carries one besides another key (its BSUID)."""
    if req.client_type != "whatsapp":
        return None
    wa_id = req.info.get("wa_id")
    if not isinstance(wa_id, str):
        return None
    digits = "".join(ch for ch in wa_id if ch.isdigit())
    return digits if digits and digits != req.channel_user_id else None


def _not_found() -> msgs.IdentityError:
    return msgs.IdentityError(status=404, code="user_not_found", title="User not found")
