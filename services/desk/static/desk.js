// The Threadline desk: one page over the desk's API (/desk/api/v1) and its live socket.
// Everything the page shows is set with textContent: customers' words never become markup.

const API = "/desk/api/v1";
const HEARTBEAT_MS = 20000;
const DAY_MS = 24 * 3600 * 1000;
const CHANNEL_NAMES = {
  whatsapp: "WhatsApp", messenger: "Messenger", telegram: "Telegram", twilio: "SMS", mailgun: "E-mail",
  web: "Web", android: "Android", ios: "iOS", sdk: "Web", unknown: "—",
};

const state = {
  agent: null, csrf: "", view: "mine", tickets: new Map(), agents: new Map(), teams: [], canned: [],
  selected: null, timeline: [], socket: null, heartbeat: null, more: null, typingSent: 0, typingTimer: null,
  matches: new Set(), searchTimer: null,
};

const $ = (id) => document.getElementById(id);

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("data-")) node.setAttribute(key, value);
    else node[key] = value;
  }
  for (const child of children) if (child) node.append(child);
  return node;
}

function badge(channel) {
  return el("span", { class: `badge ${channel || "unknown"}`, text: CHANNEL_NAMES[channel] || channel || "—" });
}

function when(value) {
  if (value === null || value === undefined) return "";
  const date = typeof value === "number" ? new Date(value * 1000) : new Date(value);
  return date.toLocaleString([], { dateStyle: "short", timeStyle: "short" });
}

class ApiError extends Error {
  constructor(status, title) { super(title); this.status = status; }
}

async function api(method, path, body) {
  const headers = { "Accept": "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (method !== "GET") headers["X-CSRF-Token"] = state.csrf;
  const response = await fetch(API + path, {
    method, headers, credentials: "same-origin", body: body === undefined ? undefined : JSON.stringify(body),
  });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    if (response.status === 401 && !path.startsWith("/session")) showSignIn();
    throw new ApiError(response.status, data.errors?.[0]?.title || `HTTP ${response.status}`);
  }
  return data;
}

// --- signing in ----------------------------------------------------------------------------------

function showSignIn(message = "") {
  stopSocket();
  $("desk").hidden = true;
  $("signin").hidden = false;
  $("signin-error").textContent = message;
  const params = new URLSearchParams(location.search);
  const form = $("signin-form");
  if (params.get("app") && !form.appId.value) form.appId.value = params.get("app");
}

async function signedIn(session) {
  state.agent = session.agent;
  state.csrf = session.csrfToken;
  $("signin").hidden = true;
  $("desk").hidden = false;
  $("me").textContent = `${state.agent.displayName} · ${state.agent.role}`;
  $("open-channels").hidden = state.agent.role !== "admin";
  await Promise.all([loadAgents(), loadTeams(), loadCanned(), loadChannels()]);
  await setPresence("online");
  openSocket();
  await loadInbox();
}

$("signin-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = event.target;
  try {
    await signedIn(await api("POST", "/session", {
      appId: form.appId.value.trim(), email: form.email.value.trim(), password: form.password.value,
    }));
    form.password.value = "";
  } catch (error) {
    $("signin-error").textContent = error.message;
  }
});

$("sso").addEventListener("click", () => {
  const appId = $("signin-form").appId.value.trim();
  if (!appId) {
    $("signin-error").textContent = "Fill in the app id first.";
    return;
  }
  location.assign(`${API}/sso/start?app=${encodeURIComponent(appId)}`);
});

$("signout").addEventListener("click", async () => {
  await setPresence("offline").catch(() => {});
  await api("DELETE", "/session").catch(() => {});
  showSignIn("Signed out.");
});

// --- presence and the live socket ----------------------------------------------------------------

async function setPresence(presence) {
  const data = await api("PUT", `/agents/${state.agent.id}/presence`, { presence });
  state.agent = data.agent;
  $("presence").value = presence;
}

$("presence").addEventListener("change", (event) => setPresence(event.target.value).catch(reportError));

function openSocket() {
  stopSocket();
  const url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}${API}/socket`;
  const socket = new WebSocket(url);
  state.socket = socket;
  socket.addEventListener("open", () => {
    $("live").classList.add("on");
    state.heartbeat = setInterval(() => socket.readyState === 1 && socket.send("beat"), HEARTBEAT_MS);
  });
  socket.addEventListener("message", (event) => onUpdate(JSON.parse(event.data)));
  socket.addEventListener("close", (event) => {
    $("live").classList.remove("on");
    clearInterval(state.heartbeat);
    if (state.socket !== socket) return;
    if (event.code === 4401 || event.code === 4403) showSignIn("Your session ended. Sign in again.");
    else setTimeout(() => state.agent && openSocket(), 2000);
  });
}

function stopSocket() {
  clearInterval(state.heartbeat);
  const socket = state.socket;
  state.socket = null;
  if (socket) socket.close();
}

function onUpdate(update) {
  if (update.kind === "ticket") {
    state.tickets.set(update.conversationId, update.data);
    renderInbox();
    if (state.selected === update.conversationId) renderHead();
  } else if (update.kind === "message" && update.conversationId === state.selected) {
    if (!state.timeline.some((item) => item.message?.id === update.data.message.id)) {
      state.timeline.push({ cursor: update.data.cursor, message: update.data.message });
      renderTimeline();
    }
  } else if (update.kind === "note" && update.conversationId === state.selected) {
    if (!state.timeline.some((item) => item.note?.id === update.data.id)) {
      state.timeline.push({ note: update.data });
      renderTimeline();
    }
  } else if (update.kind === "event" && update.conversationId === state.selected) {
    if (!state.timeline.some((item) => item.event?.id === update.data.id)) {
      state.timeline.push({ event: update.data });
      renderTimeline();
    }
  } else if (update.kind === "activity" && update.conversationId === state.selected) {
    const typing = update.data?.type === "typing:start";
    $("customer-typing").hidden = !typing;
    clearTimeout(state.typingTimer);
    if (typing) state.typingTimer = setTimeout(() => { $("customer-typing").hidden = true; }, 10000);
  } else if (update.kind === "agent") {
    if (update.data.deleted) state.agents.delete(update.data.id);
    else state.agents.set(update.data.id, update.data);
    if (update.data.id === state.agent?.id && !update.data.deleted) $("presence").value = update.data.presence;
    renderTransferOptions();
  } else if (update.kind === "removed") {
    state.tickets.delete(update.conversationId);
    if (state.selected === update.conversationId) selectConversation(null);
    renderInbox();
  }
}

// --- inbox ---------------------------------------------------------------------------------------

async function loadAgents() {
  const data = await api("GET", "/agents");
  state.agents = new Map(data.agents.map((agent) => [agent.id, agent]));
  renderTransferOptions();
}

async function loadTeams() {
  state.teams = (await api("GET", "/teams")).teams;
  const chosen = $("filter-team").value;
  $("filter-team").replaceChildren(el("option", { value: "", text: "Any team" }),
    ...state.teams.map((team) => el("option", { value: team.id, text: team.name })));
  $("filter-team").value = chosen;
  renderTransferOptions();
}

async function loadCanned() {
  state.canned = (await api("GET", "/canned-replies")).cannedReplies;
  const select = $("canned");
  select.replaceChildren(el("option", { value: "", text: "Canned replies…" }),
    ...state.canned.filter((reply) => !reply.whatsappTemplate)
      .map((reply) => el("option", { value: reply.id, text: reply.shortcut })));
}

async function loadChannels() {
  const channels = (await api("GET", "/channels")).channels;
  $("continue-on").replaceChildren(el("option", { value: "", text: "Continue on…" }),
    ...channels.filter((channel) => channel.type in CHANNEL_NAMES).map((channel) => el("option", {
      value: channel.id, text: `${CHANNEL_NAMES[channel.type] || channel.type}${channel.displayName ? ` · ${channel.displayName}` : ""}`,
    })));
}

async function loadInbox() {
  const query = new URLSearchParams({ view: state.view });
  const status = $("filter-status").value;
  const channel = $("filter-channel").value;
  const search = $("filter-search").value.trim();
  const team = $("filter-team").value;
  const label = $("filter-label").value.trim();
  if (status) query.set("status", status);
  if (channel) query.set("channel", channel);
  if (team) query.set("team", team);
  if (label) query.set("label", label);
  if (search.length >= 2) query.set("q", search);
  const data = await api("GET", `/conversations?${query}`);
  state.tickets = new Map(data.conversations.map((ticket) => [ticket.conversationId, ticket]));
  state.matches = new Set(state.tickets.keys());
  state.more = data.meta.hasMore ? { query, before: data.meta.before } : null;
  renderInbox();
}

async function loadMore() {
  if (!state.more) return;
  const query = new URLSearchParams(state.more.query);
  query.set("before", state.more.before);
  const data = await api("GET", `/conversations?${query}`);
  for (const ticket of data.conversations) {
    state.tickets.set(ticket.conversationId, ticket);
    state.matches.add(ticket.conversationId);
  }
  state.more = data.meta.hasMore ? { query: state.more.query, before: data.meta.before } : null;
  renderInbox();
}

function inView(ticket) {
  const status = $("filter-status").value;
  const channel = $("filter-channel").value;
  if (status && !status.split(",").includes(ticket.status)) return false;
  if (channel && ticket.channel !== channel) return false;
  const team = $("filter-team").value;
  const label = $("filter-label").value.trim();
  if (team && ticket.teamId !== team) return false;
  if (label && !ticket.labels.includes(label)) return false;
  if (state.view === "mine" && ticket.agentId !== state.agent.id) return false;
  if (state.view === "unassigned" && ticket.agentId) return false;
  // A search's matches come from the server (messages, customers, labels): live updates of other
  // conversations wait until the search is cleared.
  if ($("filter-search").value.trim().length >= 2 && !state.matches.has(ticket.conversationId)) return false;
  return true;
}

function renderInbox() {
  const items = [...state.tickets.values()].filter(inView).sort((a, b) => b.updatedAt - a.updatedAt);
  $("tickets").replaceChildren(...items.map((ticket) => {
    const agent = ticket.agentId ? state.agents.get(ticket.agentId)?.displayName || "an agent" : "unassigned";
    const item = el("li", { "data-conversation": ticket.conversationId },
      el("div", { class: "row" }, badge(ticket.channel), el("span", { class: "state", text: `${ticket.status} · ${agent}` })),
      el("div", { class: "preview", text: ticket.lastMessageText || "(no message yet)" }));
    if (ticket.conversationId === state.selected) item.classList.add("selected");
    item.addEventListener("click", () => selectConversation(ticket.conversationId));
    return item;
  }));
  if (state.more) {
    const more = el("li", { class: "more" }, el("button", { type: "button", text: "Load more" }));
    more.firstChild.addEventListener("click", () => loadMore().catch(reportError));
    $("tickets").append(more);
  }
}

for (const button of document.querySelectorAll(".views button")) {
  button.addEventListener("click", () => {
    state.view = button.dataset.view;
    for (const other of document.querySelectorAll(".views button")) {
      other.setAttribute("aria-selected", String(other === button));
    }
    loadInbox().catch(reportError);
  });
}
for (const id of ["filter-status", "filter-channel", "filter-team", "filter-label"]) {
  $(id).addEventListener("change", () => loadInbox().catch(reportError));
}
$("filter-search").addEventListener("input", () => {
  clearTimeout(state.searchTimer);
  state.searchTimer = setTimeout(() => loadInbox().catch(reportError), 300);
});

// --- the conversation ----------------------------------------------------------------------------

async function selectConversation(conversationId) {
  state.selected = conversationId;
  $("thread").hidden = !conversationId;
  $("thread-empty").hidden = Boolean(conversationId);
  renderInbox();
  if (!conversationId) return;
  const [timeline, context] = await Promise.all([
    api("GET", `/conversations/${conversationId}/messages?limit=1000`),
    api("GET", `/conversations/${conversationId}/context`),
    loadCanned(),
  ]);
  if (state.selected !== conversationId) return;
  state.tickets.set(conversationId, timeline.ticket);
  state.timeline = [
    ...timeline.messages.map((item) => ({ cursor: item.cursor, message: item.message })),
    ...timeline.notes.map((note) => ({ note })),
    ...timeline.events.map((event) => ({ event })),
  ];
  renderHead();
  renderTimeline();
  renderContext(context);
  $("customer-typing").hidden = true;
  activity("conversation:read");
}

// The agent's typing and reading, shown to the customer where the channel can.
function activity(type) {
  if (!state.selected) return;
  api("POST", `/conversations/${state.selected}/activity`, { type }).catch(() => {});
}

$("reply-text").addEventListener("input", () => {
  if ($("reply-form").mode.value !== "reply") return;
  const now = Date.now();
  if (now - (state.typingSent || 0) > 5000) {
    state.typingSent = now;
    activity("typing:start");
  }
});
$("reply-text").addEventListener("blur", () => {
  if (state.typingSent) {
    state.typingSent = 0;
    activity("typing:stop");
  }
});

function ticketOf() {
  return state.tickets.get(state.selected);
}

function renderHead() {
  const ticket = ticketOf();
  if (!ticket) return;
  const agent = ticket.agentId ? state.agents.get(ticket.agentId)?.displayName || "an agent" : "nobody yet";
  $("thread-title").replaceChildren(badge(ticket.channel), ` Conversation ${ticket.conversationId.slice(-6)}`);
  $("thread-state").textContent = `${ticket.status}${ticket.queued ? " · waiting in the queue" : ""} · with ${agent}`
    + (ticket.snoozedUntil ? ` · snoozed until ${when(ticket.snoozedUntil)}` : "");
  $("accept").hidden = ticket.agentId === state.agent.id;
  $("labels").value = ticket.labels.join(", ");
}

function timeOf(item) {
  if (item.note) return item.note.createdAt * 1000;
  if (item.event) return item.event.createdAt * 1000;
  return Date.parse(item.message.received);
}

function renderTimeline() {
  state.timeline.sort((a, b) => timeOf(a) - timeOf(b) || (a.cursor ?? 0) - (b.cursor ?? 0));
  const list = $("timeline");
  list.replaceChildren(...state.timeline.map((item) => {
    if (item.event) {
      return el("li", { class: "event", "data-kind": item.event.kind },
        item.event.channel ? badge(item.event.channel) : null, ` ${item.event.text} · ${when(item.event.createdAt)}`);
    }
    if (item.note) {
      return el("li", { class: "note" },
        el("div", { class: "meta", text: `Private note · ${item.note.authorName} · ${when(item.note.createdAt)}` }),
        el("div", { class: "text", text: item.note.text }));
    }
    const message = item.message;
    const author = message.author || {};
    const content = message.content || {};
    const channel = message.source?.type || "";
    const who = author.type === "business" ? (author.displayName || "Business") : (author.displayName || "Customer");
    let text = content.text || "";
    if (!text && content.mediaUrl) text = `[${content.type}] ${content.altText || content.mediaUrl}`;
    if (!text) text = `[${content.type || "message"}]`;
    return el("li", { class: author.type === "business" ? "business" : "user", "data-message": message.id },
      el("div", { class: "meta" }, channel ? badge(channel.startsWith("api") ? "api" : channel) : null,
        el("span", { text: `${who} · ${when(message.received)}` })),
      el("div", { class: "text", text }));
  }));
  list.scrollTop = list.scrollHeight;
  renderWindowWarning();
}

function renderWindowWarning() {
  const ticket = ticketOf();
  const lastCustomer = [...state.timeline].reverse().find((item) => item.message?.author?.type === "user");
  const closed = ticket?.channel === "whatsapp" && lastCustomer
    && Date.now() - Date.parse(lastCustomer.message.received) > DAY_MS;
  $("window-warning").hidden = !closed;
  $("window-warning").textContent = closed
    ? "WhatsApp's 24-hour window is closed: a free-form reply will fail. Send an approved template "
      + "or continue on another channel." : "";
  const templates = state.canned.filter((reply) => reply.whatsappTemplate);
  $("template-picker").hidden = !closed;
  $("template").replaceChildren(el("option", { value: "", text: templates.length
    ? "Send an approved template…" : "No template: an admin adds canned replies with a WhatsApp template" }),
  ...templates.map((reply) => el("option", { value: reply.id,
    text: `${reply.shortcut} (${reply.whatsappTemplate.name}, ${reply.whatsappTemplate.language})` })));
}

function renderContext(context) {
  const user = context.user;
  const profile = user?.profile || {};
  const rows = [["Name", [profile.givenName, profile.surname].filter(Boolean).join(" ")], ["E-mail", profile.email],
    ["Locale", profile.locale], ["External id", user?.externalId], ["User id", user?.id]];
  for (const [key, value] of Object.entries(user?.metadata || {})) rows.push([key, String(value)]);
  $("customer").replaceChildren(el("dl", {}, ...rows.filter(([, value]) => value)
    .flatMap(([key, value]) => [el("dt", { text: key }), el("dd", { text: value })])));
  $("identities").replaceChildren(...context.clients.map((client) => el("li", {},
    badge(client.type), ` ${client.displayName || client.externalId || client.id} · ${client.status}`)));
  $("suggestions-block").hidden = !context.mergeSuggestions.length;
  $("suggestions").replaceChildren(...context.mergeSuggestions.map((suggestion) => {
    const item = el("li", { "data-user": suggestion.userId },
      `Another customer with the same ${suggestion.reason === "phone" ? "phone number" : "e-mail address"} on `,
      ...suggestion.channels.map((channel) => badge(channel)));
    if (suggestion.confirmOn) {
      const ask = el("button", { type: "button", text: `Ask them to confirm on ${CHANNEL_NAMES[suggestion.confirmOn.type]}` });
      ask.addEventListener("click", () => act(api("POST", `/conversations/${state.selected}/handoff`,
        { integrationId: suggestion.confirmOn.integrationId })));
      item.append(" ", ask);
    }
    return item;
  }));
  $("opt-ins").replaceChildren(...(context.optIns.length ? context.optIns.map((optIn) => el("li", {},
    badge(optIn.channel), ` ${optIn.maskedAddress} · ${optIn.status}`)) : [el("li", { class: "fine", text: "No opt-in: notified on the channel they last used" })]));
  $("cards").replaceChildren(
    ...(context.contextError ? [el("p", { class: "fine", text: `Context unavailable: ${context.contextError}` })] : []),
    ...context.cards.map((card) => el("section", { class: "card-item" },
      el("h4", { text: card.title }),
      el("dl", {}, ...card.fields.flatMap((field) => [el("dt", { text: field.label }), el("dd", { text: field.value })])),
      card.url ? el("a", { href: card.url, target: "_blank", rel: "noopener noreferrer", text: "Open" }) : null)));
  $("previous").replaceChildren(...context.previousConversations.map((ticket) => {
    const item = el("li", {}, badge(ticket.channel), ` ${ticket.status} · ${when(ticket.updatedAt)}`);
    item.addEventListener("click", () => selectConversation(ticket.conversationId));
    return item;
  }));
}

function renderTransferOptions() {
  const select = $("transfer");
  const agents = [...state.agents.values()].filter((agent) => agent.id !== state.agent?.id && !agent.disabled);
  select.replaceChildren(el("option", { value: "", text: "Transfer…" }),
    ...agents.map((agent) => el("option", { value: `agent:${agent.id}`, text: `${agent.displayName} (${agent.presence})` })),
    ...state.teams.map((team) => el("option", { value: `team:${team.id}`, text: `Team ${team.name}` })));
}

async function act(promise) {
  try {
    const data = await promise;
    if (data?.conversation) {
      state.tickets.set(data.conversation.conversationId, data.conversation);
      renderHead();
      renderInbox();
    }
    $("reply-error").textContent = "";
  } catch (error) {
    reportError(error);
  }
}

function reportError(error) {
  $("reply-error").textContent = error.message;
}

$("accept").addEventListener("click", () => act(api("POST", `/conversations/${state.selected}/assign`, {})));
$("pending").addEventListener("click", () => act(api("PUT", `/conversations/${state.selected}/status`, { status: "pending" })));
$("resolve").addEventListener("click", () => act(api("PUT", `/conversations/${state.selected}/status`, { status: "resolved" })));
$("snooze").addEventListener("click", () => act(api("PUT", `/conversations/${state.selected}/status`,
  { status: "snoozed", snoozedUntil: Date.now() / 1000 + 3600 })));
$("transfer").addEventListener("change", (event) => {
  const [kind, id] = event.target.value.split(":");
  event.target.value = "";
  if (id) act(api("POST", `/conversations/${state.selected}/transfer`, kind === "agent" ? { agentId: id } : { teamId: id }));
});
$("continue-on").addEventListener("change", (event) => {
  const integrationId = event.target.value;
  event.target.value = "";
  if (integrationId) act(api("POST", `/conversations/${state.selected}/handoff`, { integrationId }));
});
$("labels").addEventListener("change", (event) => act(api("PUT", `/conversations/${state.selected}/labels`,
  { labels: event.target.value.split(",").map((label) => label.trim()).filter(Boolean) })));
$("template").addEventListener("change", (event) => {
  const reply = state.canned.find((item) => item.id === event.target.value);
  event.target.value = "";
  if (!reply || !state.selected) return;
  const template = { name: reply.whatsappTemplate.name, language: { code: reply.whatsappTemplate.language } };
  act(api("POST", `/conversations/${state.selected}/messages`, { content: { type: "template", template } }));
});
$("canned").addEventListener("change", (event) => {
  const reply = state.canned.find((item) => item.id === event.target.value);
  event.target.value = "";
  if (reply) $("reply-text").value = reply.text;
});

$("reply-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const text = $("reply-text").value.trim();
  if (!text || !state.selected) return;
  const note = event.target.mode.value === "note";
  try {
    if (note) await api("POST", `/conversations/${state.selected}/notes`, { text });
    else await api("POST", `/conversations/${state.selected}/messages`, { text });
    state.typingSent = 0;
    $("reply-text").value = "";
    $("reply-error").textContent = "";
  } catch (error) {
    reportError(error);
  }
});

// --- channel setup (admins) ------------------------------------------------------------------

// What each platform needs: the fields of the business API's integration body.
const CHANNEL_FIELDS = {
  whatsapp: [["phoneNumber", "Phone number (+E.164)"], ["phoneNumberId", "Phone number id"],
    ["accessToken", "Access token", "password"], ["appSecret", "App secret", "password"]],
  messenger: [["pageId", "Page id"], ["pageAccessToken", "Page access token", "password"], ["appId", "App id"],
    ["appSecret", "App secret", "password"]],
  telegram: [["token", "Bot token", "password"], ["username", "Bot username"]],
  twilio: [["accountSid", "Account SID"], ["authToken", "Auth token", "password"], ["phoneNumber", "Phone number (+E.164)"]],
  mailgun: [["incomingAddress", "Address customers write to"], ["smtpHost", "SMTP server"], ["smtpPort", "SMTP port", "number"],
    ["username", "SMTP user"], ["password", "SMTP password", "password"]],
  web: [["businessName", "Business name"], ["brandColor", "Brand colour (hex, no #)"]],
  android: [["projectId", "Firebase project id"], ["clientEmail", "Service account e-mail"],
    ["privateKey", "Service account private key (PEM)", "textarea"]],
  ios: [["bundleId", "Bundle id"], ["teamId", "Team id"], ["keyId", "APNs key id"],
    ["signingKey", "APNs signing key (.p8, PEM)", "textarea"], ["production", "Production APNs (yes/no)", "boolean"]],
};

function renderChannelFields() {
  const type = $("channel-type").value;
  $("channel-fields").replaceChildren(...CHANNEL_FIELDS[type].map(([name, label, kind]) =>
    el("label", {}, label, kind === "textarea"
      ? el("textarea", { name, rows: 4, autocomplete: "off", spellcheck: false })
      : el("input", { name, type: kind === "number" ? "number" : kind === "password" ? "password" : "text",
        autocomplete: "off" }))));
}

async function showChannels(show) {
  $("channels").hidden = !show;
  document.querySelector(".thread").hidden = show;
  document.querySelector(".context").hidden = show;
  if (!show) return;
  const settings = (await api("GET", "/settings")).settings;
  const form = $("settings-form");
  form.contextUrl.value = settings.contextUrl || "";
  $("context-secret").textContent = settings.contextSecret ? `Signing secret: ${settings.contextSecret}` : "";
  form.issuer.value = settings.sso?.issuer || "";
  form.clientId.value = settings.sso?.clientId || "";
  form.clientSecret.value = "";
  $("sso-redirect").textContent = `Redirect URI to register: ${location.origin}${API}/sso/callback`;
  const channels = (await api("GET", "/channels")).channels;
  $("channel-rows").replaceChildren(...channels.map((channel) => {
    const paste = el("td");
    for (const [key, label] of [["webhookUrl", "Webhook URL"], ["verifyToken", "Verify token"],
      ["incomingAddress", "Address"], ["phoneNumber", "Number"], ["pageId", "Page"], ["username", "Bot"]]) {
      if (channel[key]) paste.append(el("div", {}, `${label}: `, el("code", { text: channel[key] })));
    }
    const remove = el("button", { type: "button", text: "Remove" });
    remove.addEventListener("click", async () => {
      if (!confirm(`Remove ${channel.displayName || channel.type}? Customers on it can no longer write.`)) return;
      try {
        await api("DELETE", `/channels/${channel.id}`);
        await showChannels(true);
        await loadChannels();
      } catch (error) {
        $("channel-error").textContent = error.message;
      }
    });
    return el("tr", { "data-channel": channel.id },
      el("td", {}, badge(channel.type), ` ${channel.displayName || ""}`), paste,
      el("td", { text: channel.lastWebhookAt ? when(channel.lastWebhookAt) : (CHANNEL_FIELDS[channel.type] && channel.webhookUrl ? "never" : "—") }),
      el("td", { text: channel.status }), el("td", {}, remove));
  }));
}

$("open-channels").addEventListener("click", () => showChannels(true).catch(reportError));
$("close-channels").addEventListener("click", () => showChannels(false));
$("channel-type").addEventListener("change", renderChannelFields);
$("settings-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = event.target;
  const url = form.contextUrl.value.trim();
  const body = { contextUrl: url || null };
  if (form.issuer.value.trim()) {
    body.sso = { issuer: form.issuer.value.trim(), clientId: form.clientId.value.trim() };
    if (form.clientSecret.value) body.sso.clientSecret = form.clientSecret.value;
  } else {
    body.sso = null;
  }
  try {
    const settings = (await api("PUT", "/settings", body)).settings;
    form.clientSecret.value = "";
    $("context-secret").textContent = settings.contextSecret ? `Signing secret: ${settings.contextSecret}` : "";
    $("settings-error").textContent = "";
  } catch (error) {
    $("settings-error").textContent = error.message;
  }
});
$("channel-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = event.target;
  const body = { type: form.type.value };
  if (form.displayName.value.trim()) body.displayName = form.displayName.value.trim();
  for (const [name, , kind] of CHANNEL_FIELDS[body.type]) {
    const value = form.elements[name].value.trim();
    if (!value) continue;
    if (kind === "number") body[name] = Number(value);
    else if (kind === "boolean") body[name] = /^(y|yes|true|1)$/i.test(value);
    else body[name] = value;
  }
  try {
    await api("POST", "/channels", body);
    form.reset();
    renderChannelFields();
    $("channel-error").textContent = "";
    await showChannels(true);
    await loadChannels();
  } catch (error) {
    $("channel-error").textContent = error.message;
  }
});
renderChannelFields();

// --- start ---------------------------------------------------------------------------------------

async function start() {
  document.querySelector('.views button[data-view="mine"]').setAttribute("aria-selected", "true");
  const demo = new URLSearchParams(location.hash.slice(1)).get("demo");
  if (demo) {
    history.replaceState(null, "", location.pathname);
    try {
      await signedIn(await api("POST", "/session/demo", { appId: demo }));
      return;
    } catch (error) {
      showSignIn(error.message);
      return;
    }
  }
  try {
    await signedIn(await api("GET", "/session"));
  } catch {
    showSignIn();
  }
}

start();
