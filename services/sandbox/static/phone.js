// The simulated phone of the sandbox page: one phone frame, one tab per channel the sandbox has
// (WhatsApp, Messenger, Telegram, SMS). The chosen channel's phone polls its fake's thread for
// one customer and sends what is typed (or tapped) as that customer through the fake, which
// delivers a real, signed webhook to the gateway.
(function () {
  "use strict";
  const config = window.SANDBOX || {};
  const $ = (id) => document.getElementById(id);
  const frame = $("phone-frame");
  const thread = $("phone-thread");
  const numberInput = $("phone-number");
  const nameInput = $("phone-name");
  const textInput = $("phone-text");
  const quick = $("phone-quick");
  const errorLine = $("phone-error");
  const tabs = $("phone-tabs");
  const businessName = config.businessName || "Threadline";

  // --- helpers ---------------------------------------------------------------------------------

  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    return node;
  }
  function link(href, text) {
    const a = el("a", "", text);
    a.href = href;
    a.target = "_blank";
    a.rel = "noopener";
    return a;
  }
  function choiceButton(title, onTap) {
    const button = el("button", "", title);
    button.type = "button";
    button.addEventListener("click", onTap);
    return button;
  }

  // --- the channels ------------------------------------------------------------------------------
  // Each adapter turns its fake's /thread answer into items {key, direction ("in": the customer
  // sent it), at (Unix seconds), render(bubble), footer} and knows what the phone sends.

  const whatsapp = {
    label: "WhatsApp", who: "WhatsApp customer", fromLabel: "Your number", defaultFrom: "+15551234567",
    fromKey: "sandbox.phone.number", placeholder: "Message",
    title: () => businessName,
    subtitle: (ch) => "WhatsApp business" + (ch.number ? " · " + ch.number : ""),
    address: (ch) => ch.number,
    inbound: (from, name, spec) => Object.assign({from, name}, spec),
    items(data) {
      return (data.messages || []).map((m) => ({
        key: m.wamid, direction: m.direction, at: m.at,
        state: m.status + "|" + JSON.stringify(m.errors || []),
        render: (bubble) => (m.direction === "out" ? waOut(m.body, bubble) : waIn(m.body, bubble)),
        footer: (footer) => {
          if (m.status === "failed") footer.append(el("div", "failed", "not delivered: " + (((m.errors || [])[0] || {}).title || "")));
          const ticks = m.direction === "in" ? (m.status === "read" ? " ✓✓" : " ✓") : "";
          footer.append(el("span", "meta" + (m.status === "read" && m.direction === "in" ? " read" : ""), clock(m.at) + ticks));
        },
      }));
    },
    markRead(data, api) {
      for (const m of data.messages || []) {
        if (m.direction === "out" && m.status !== "read" && m.status !== "failed" && !readSent.has(m.wamid)) {
          readSent.add(m.wamid);
          api("/status", {wamid: m.wamid, status: "read"}).catch(() => readSent.delete(m.wamid));
        }
      }
    },
  };

  function waOut(body, bubble) {
    const type = body.type || "text";
    if (type === "text") bubble.append(el("div", "", body.text.body));
    else if (type === "image") {
      renderImage(body.image.link || "", body.image.caption || "", bubble);
      if (body.image.caption) bubble.append(el("div", "", body.image.caption));
    } else if (type === "document") {
      bubble.append(link(body.document.link, "📄 " + (body.document.filename || "document")));
    } else if (type === "location") {
      bubble.append(el("div", "", "📍 " + (body.location.name || "") + " " + body.location.latitude + "," + body.location.longitude));
    } else if (type === "template") {
      bubble.append(el("div", "template", "Template " + body.template.name));
      for (const component of body.template.components || []) {
        const params = (component.parameters || []).map((p) => p.text || p.payload || "").filter(Boolean);
        if (params.length) bubble.append(el("div", "", params.join(" · ")));
      }
    } else if (type === "interactive") {
      const inter = body.interactive;
      if (inter.body) bubble.append(el("div", "", inter.body.text));
      const buttons = el("div", "buttons");
      const choices = inter.type === "button"
        ? inter.action.buttons.map((b) => ({id: b.reply.id, title: b.reply.title, kind: "buttonReply"}))
        : [].concat(...(inter.action.sections || []).map((s) => s.rows.map((r) => ({id: r.id, title: r.title, kind: "listReply"}))));
      for (const choice of choices) {
        buttons.append(choiceButton(choice.title, () => sendAsCustomer({[choice.kind]: {id: choice.id, title: choice.title}})));
      }
      bubble.append(buttons);
    } else bubble.append(el("div", "", "[" + type + "]"));
  }

  function waIn(body, bubble) {
    if (body.type === "text") bubble.append(el("div", "", body.text.body));
    else if (body.type === "interactive") {
      const reply = body.interactive.button_reply || body.interactive.list_reply || {};
      bubble.append(el("div", "", reply.title || "[choice]"));
    } else if (body.type === "image") bubble.append(el("div", "", "🖼 " + (body.image.caption || "image")));
    else bubble.append(el("div", "", "[" + body.type + "]"));
  }

  const messenger = {
    label: "Messenger", who: "Messenger user", fromLabel: "Your PSID", defaultFrom: "7100000000000001",
    fromKey: "sandbox.phone.messenger.psid", placeholder: "Aa",
    title: (ch) => ch.pageName || businessName,
    subtitle: (ch) => "Messenger" + (ch.pageId ? " · m.me/" + ch.pageId : ""),
    address: (ch) => (ch.pageId ? "m.me/" + ch.pageId : ch.pageName),
    inbound: (from, name, spec) => Object.assign({from, name}, spec),
    items(data) {
      return (data.messages || []).map((m, index) => ({
        key: m.mid || "event-" + index + "-" + m.at, direction: m.direction, at: m.at, state: m.status,
        render: (bubble) => (m.direction === "out" ? msOut(m.body.message || {}, bubble) : msIn(m.body, bubble)),
        footer: (footer) => {
          footer.append(el("span", "meta", clock(m.at)));
        },
        quickReplies: m.direction === "out" ? ((m.body.message || {}).quick_replies || [])
          .filter((q) => q.content_type === "text")
          .map((q) => ({title: q.title, spec: {text: q.title, quickReply: q.payload}})) : [],
      }));
    },
    markRead(data, api, from) {
      const unread = (data.messages || []).filter((m) => m.direction === "out" && m.status !== "read" && !readSent.has(m.mid));
      if (!unread.length) return;
      unread.forEach((m) => readSent.add(m.mid));
      api("/read", {to: from}).catch(() => unread.forEach((m) => readSent.delete(m.mid)));
    },
  };

  function msButtons(buttons, bubble) {
    const box = el("div", "buttons");
    for (const b of buttons || []) {
      if (b.type === "postback") {
        box.append(choiceButton(b.title, () => sendAsCustomer({postback: {payload: b.payload, title: b.title}})));
      } else if (b.type === "web_url") {
        box.append(link(b.url, b.title));
      } else box.append(el("span", "", b.title || "[" + b.type + "]"));
    }
    bubble.append(box);
  }

  function msOut(message, bubble) {
    if (message.text) bubble.append(el("div", "", message.text));
    const attachment = message.attachment;
    if (!attachment) return;
    const payload = attachment.payload || {};
    if (attachment.type === "image") renderImage(payload.url || "", "image", bubble);
    else if (attachment.type === "template" && payload.template_type === "button") {
      bubble.append(el("div", "", payload.text || ""));
      msButtons(payload.buttons, bubble);
    } else if (attachment.type === "template" && payload.template_type === "generic") {
      for (const element of payload.elements || []) {
        if (element.image_url) renderImage(element.image_url, element.title, bubble);
        bubble.append(el("div", "card-title", element.title || ""));
        if (element.subtitle) bubble.append(el("div", "card-sub", element.subtitle));
        msButtons(element.buttons, bubble);
      }
    } else if (payload.url) bubble.append(link(payload.url, "📎 " + attachment.type));
    else bubble.append(el("div", "", "[" + attachment.type + "]"));
  }

  function msIn(event, bubble) {
    if (event.message) {
      if (event.message.text) bubble.append(el("div", "", event.message.text));
      for (const a of event.message.attachments || []) bubble.append(el("div", "", "📎 " + a.type));
    } else if (event.postback) {
      bubble.append(el("div", "", event.postback.title || event.postback.payload));
      if (event.postback.referral) bubble.append(el("div", "note", "opened from m.me?ref=" + event.postback.referral.ref));
    } else if (event.referral) {
      bubble.append(el("div", "note", "opened m.me?ref=" + event.referral.ref));
    } else bubble.append(el("div", "", "[event]"));
  }

  const telegram = {
    label: "Telegram", who: "Telegram user", fromLabel: "Your user id", defaultFrom: "424242001",
    fromKey: "sandbox.phone.telegram.user", placeholder: "Message",
    title: () => businessName,
    subtitle: (ch) => "bot" + (ch.username ? " · @" + ch.username : ""),
    address: (ch) => (ch.username ? "@" + ch.username : null),
    inbound: (from, name, spec) => Object.assign({from: /^\d+$/.test(from) ? Number(from) : from, name}, spec),
    items(data) {
      return (data.messages || []).map((m) => {
        const msg = m.message || {};
        const pressed = m.callbackQuery;
        return {
          key: pressed ? "cb-" + pressed.id : (m.direction === "out" ? "out-" : "in-") + msg.message_id,
          direction: m.direction, at: m.at, state: "",
          render: (bubble) => {
            if (pressed) bubble.append(el("div", "pressed", tgButtonText(msg, pressed.data)));
            else tgMessage(msg, m.params || {}, bubble);
          },
          footer: (footer) => footer.append(el("span", "meta", clock(m.at) + (m.direction === "in" ? " ✓✓" : ""))),
        };
      });
    },
    markRead() { /* bots never learn that a user read their messages */ },
  };

  function tgButtonText(message, data) {
    for (const row of (message.reply_markup || {}).inline_keyboard || []) {
      for (const b of row) if (b.callback_data === data) return b.text;
    }
    return data;
  }

  function tgMessage(msg, params, bubble) {
    if (msg.reply_to_message) {
      const quoted = msg.reply_to_message;
      bubble.append(el("div", "quote", quoted.text || quoted.caption || "[message]"));
    }
    if (msg.photo) {
      const source = typeof params.photo === "string" ? params.photo : "";
      if (source && /^https?:/.test(source)) renderImage(source, msg.caption || "photo", bubble);
      else bubble.append(el("div", "", "🖼 photo"));
    }
    if (msg.document) bubble.append(el("div", "", "📄 " + (msg.document.file_name || "document")));
    if (msg.location) bubble.append(el("div", "", "📍 " + msg.location.latitude + "," + msg.location.longitude));
    if (msg.text) bubble.append(el("div", "", msg.text));
    if (msg.caption) bubble.append(el("div", "", msg.caption));
    const rows = (msg.reply_markup || {}).inline_keyboard;
    if (rows && rows.length) {
      const keyboard = el("div", "tg-keyboard");
      for (const row of rows) {
        const line = el("div", "tg-row");
        for (const b of row) {
          if (b.callback_data !== undefined) line.append(choiceButton(b.text, () => sendAsCustomer({callbackData: b.callback_data})));
          else if (b.url) line.append(link(b.url, b.text + " ↗"));
          else line.append(el("span", "", b.text));
        }
        keyboard.append(line);
      }
      bubble.append(keyboard);
    }
  }

  const twilio = {
    label: "SMS", who: "SMS customer", fromLabel: "Your number", defaultFrom: "+15557654321",
    fromKey: "sandbox.phone.sms.number", placeholder: "Text Message",
    title: (ch) => ch.number || businessName,
    hasName: false, // an SMS carries no profile name
    subtitle: () => "Text message · SMS/MMS",
    address: (ch) => ch.number,
    inbound: (from, _name, spec) => Object.assign({from}, spec),
    items(data) {
      return (data.messages || []).map((m) => ({
        key: m.sid, direction: m.direction, at: m.at, state: m.status + "|" + (m.errorCode || ""),
        render: (bubble) => {
          const body = m.body || {};
          const media = m.direction === "out" ? (body.MediaUrl || [])
            : Object.keys(body).filter((k) => /^MediaUrl\d+$/.test(k)).map((k) => body[k]);
          for (const url of media) {
            if (m.direction === "out") renderImage(url, "MMS", bubble);
            else bubble.append(el("div", "", "🖼 picture"));
          }
          if (body.Body) bubble.append(el("div", "", body.Body));
        },
        footer: (footer) => {
          if (m.status === "failed" || m.status === "undelivered") footer.append(el("div", "failed", "not delivered (" + (m.errorCode || m.status) + ")"));
          footer.append(el("span", "meta", clock(m.at)));
        },
      }));
    },
    markRead() { /* SMS has no read receipts */ },
  };

  const ADAPTERS = {whatsapp, messenger, telegram, twilio};
  const channels = (Array.isArray(config.channels) ? config.channels : [])
    .filter((ch) => ch && ADAPTERS[ch.kind] && ch.integrationId);
  if (!channels.length && config.whatsappIntegrationId) {
    channels.push({kind: "whatsapp", integrationId: config.whatsappIntegrationId, number: config.whatsappNumber});
  }

  // --- state ----------------------------------------------------------------------------------------

  let current = null; // {kind, integrationId, …} of the tab shown
  let adapter = whatsapp;
  let generation = 0; // answers of an earlier channel or sender are dropped
  let bubbles = new Map();
  const readSent = new Set();
  // Image links that failed once: shown as a placeholder from then on, never fetched again.
  const brokenImages = new Set();

  function clock(at) {
    return new Date(at * 1000).toLocaleTimeString([], {hour: "2-digit", minute: "2-digit"});
  }

  // Whether the thread shows its end: content that grows later (an image loading, a placeholder)
  // keeps the newest message in view then, but does not yank a reader who scrolled up.
  let pinned = true;
  const atEnd = () => thread.scrollTop + thread.clientHeight >= thread.scrollHeight - 4;
  thread.addEventListener("scroll", () => { pinned = atEnd(); });
  function scrollToNewest() { thread.scrollTop = thread.scrollHeight; pinned = true; }

  function resetThread() {
    generation += 1;
    bubbles = new Map();
    thread.textContent = "";
    quick.textContent = "";
    quick.hidden = true;
    showError("");
  }

  function showError(text) {
    errorLine.textContent = text;
    errorLine.hidden = !text;
  }

  // An icon drawn inline: no emoji font needed for the placeholder.
  const PICTURE_ICON = '<svg width="16" height="16" viewBox="0 0 24 24" aria-hidden="true"><path fill="currentColor" ' +
    'd="M21 5v14H3V5h18m0-2H3a2 2 0 0 0-2 2v14a2 2 0 0 0 2 2h18a2 2 0 0 0 2-2V5a2 2 0 0 0-2-2zm-7.5 9.5L11 ' +
    '15.5l-2-2.5-3 4h12l-3.5-4.5z"/></svg>';
  const PERSON_ICON = '<svg width="20" height="20" viewBox="0 0 24 24" aria-hidden="true"><path fill="currentColor" ' +
    'd="M12 12a5 5 0 1 0 0-10 5 5 0 0 0 0 10zm0 2c-4.4 0-9 2.2-9 5v3h18v-3c0-2.8-4.6-5-9-5z"/></svg>';
  function imagePlaceholder() {
    const box = el("div", "img-missing");
    box.innerHTML = PICTURE_ICON;
    box.append(el("span", "", "image unavailable"));
    return box;
  }

  function renderImage(href, caption, bubble) {
    if (!href || brokenImages.has(href)) {
      bubble.append(imagePlaceholder());
      return;
    }
    const img = el("img");
    img.alt = caption || "image";
    img.addEventListener("error", () => {
      brokenImages.add(href);
      const wasPinned = pinned;
      img.replaceWith(imagePlaceholder());
      if (wasPinned) scrollToNewest();
    }, {once: true});
    img.addEventListener("load", () => { if (pinned) scrollToNewest(); }, {once: true});
    img.src = href;
    bubble.append(img);
  }

  // --- talking to the fake -----------------------------------------------------------------------

  function api(path, body) {
    const base = "/sandbox/" + current.kind + "/" + encodeURIComponent(current.integrationId);
    return fetch(base + path, {
      method: body ? "POST" : "GET",
      headers: body ? {"Content-Type": "application/json"} : {},
      body: body ? JSON.stringify(body) : undefined,
    }).then(async (response) => {
      const data = await response.json().catch(() => ({}));
      if (!response.ok) {
        const title = ((data.errors || [])[0] || {}).title || ("HTTP " + response.status);
        throw new Error(title);
      }
      return data;
    });
  }

  function sendAsCustomer(spec) {
    if (!current) return Promise.resolve();
    const from = numberInput.value.trim();
    return api("/inbound", adapter.inbound(from, nameInput.value.trim(), spec))
      .then(() => { showError(""); return poll(); })
      .then(scrollToNewest)
      .catch((e) => showError("Not sent: " + e.message));
  }

  function render(items) {
    let added = false;
    let previous = null;
    const keys = new Set();
    for (const item of items) {
      keys.add(item.key);
      let entry = bubbles.get(item.key);
      if (!entry) {
        const bubble = el("li", "bubble " + item.direction);
        bubble.dataset.key = item.key;
        item.render(bubble);
        const footer = el("div", "footer");
        bubble.append(footer);
        entry = {bubble, footer, state: null};
        bubbles.set(item.key, entry);
        thread.insertBefore(bubble, previous ? previous.nextSibling : thread.firstChild);
        added = true;
      }
      if (entry.state !== item.state) {
        entry.footer.textContent = "";
        item.footer(entry.footer);
        entry.state = item.state;
      }
      previous = entry.bubble;
    }
    for (const [key, entry] of bubbles) {
      if (!keys.has(key)) { entry.bubble.remove(); bubbles.delete(key); }
    }
    // Quick replies belong to the newest message only, as on the real app.
    const last = items[items.length - 1];
    const replies = last && last.direction === "out" ? last.quickReplies || [] : [];
    const signature = JSON.stringify(replies.map((r) => r.title));
    if (quick.dataset.signature !== signature) {
      quick.dataset.signature = signature;
      quick.textContent = "";
      for (const reply of replies) quick.append(choiceButton(reply.title, () => sendAsCustomer(reply.spec)));
      quick.hidden = !replies.length;
      added = true;
    }
    // A new message (either side, a button reply included) brings the newest into view.
    if (added) scrollToNewest();
  }

  async function poll() {
    if (!current || !numberInput.value.trim()) return;
    const mine = generation;
    const from = numberInput.value.trim();
    try {
      const data = await api("/thread?to=" + encodeURIComponent(from));
      if (mine !== generation) return;
      render(adapter.items(data));
      if (document.visibilityState === "visible") adapter.markRead(data, api, from);
    } catch (e) { /* the sandbox restarts, or this sender has no thread yet; try again on the next tick */ }
  }

  // --- tabs ------------------------------------------------------------------------------------------

  function select(kind, remember) {
    const next = channels.find((ch) => ch.kind === kind) || channels[0];
    if (!next) return;
    if (current && current.kind === next.kind) return;
    current = next;
    adapter = ADAPTERS[next.kind];
    if (remember) localStorage.setItem("sandbox.phone.channel", next.kind);
    frame.dataset.channel = next.kind;
    for (const tab of tabs.querySelectorAll("[role=tab]")) {
      const active = tab.dataset.channel === next.kind;
      tab.setAttribute("aria-selected", String(active));
      tab.tabIndex = active ? 0 : -1;
    }
    $("phone-who").textContent = adapter.who;
    $("phone-title").textContent = adapter.title(next);
    $("phone-business").textContent = adapter.subtitle(next);
    if (adapter.hasName === false) $("phone-avatar").innerHTML = PERSON_ICON;
    else $("phone-avatar").textContent = (adapter.title(next) || "?").charAt(0).toUpperCase();
    nameInput.parentElement.hidden = adapter.hasName === false;
    $("phone-number-label").textContent = adapter.fromLabel;
    frame.setAttribute("aria-label", "Simulated " + adapter.label + " phone");
    textInput.placeholder = adapter.placeholder;
    textInput.setAttribute("aria-label", adapter.label + " message");
    numberInput.value = localStorage.getItem(adapter.fromKey) || adapter.defaultFrom;
    const address = $("channel-address");
    if (address) address.textContent = (adapter.address(next) || "the business") + " on " + adapter.label;
    resetThread();
    poll();
  }

  for (const ch of channels) {
    const tab = el("button", "phone-tab");
    tab.type = "button";
    tab.setAttribute("role", "tab");
    tab.id = "tab-" + ch.kind;
    tab.dataset.channel = ch.kind;
    tab.setAttribute("aria-controls", "phone-frame");
    tab.append(el("span", "dot"), el("span", "", ADAPTERS[ch.kind].label));
    tab.addEventListener("click", () => select(ch.kind, true));
    tabs.append(tab);
  }
  tabs.hidden = channels.length < 2;
  tabs.addEventListener("keydown", (event) => {
    if (event.key !== "ArrowRight" && event.key !== "ArrowLeft") return;
    const index = channels.findIndex((ch) => ch === current);
    const step = event.key === "ArrowRight" ? 1 : channels.length - 1;
    const next = channels[(index + step) % channels.length];
    select(next.kind, true);
    $("tab-" + next.kind).focus();
  });

  nameInput.value = localStorage.getItem("sandbox.phone.name") || nameInput.value;
  numberInput.addEventListener("change", () => {
    localStorage.setItem(adapter.fromKey, numberInput.value.trim());
    resetThread();
    poll();
  });
  nameInput.addEventListener("change", () => localStorage.setItem("sandbox.phone.name", nameInput.value));

  if (!channels.length) {
    const notice = $("sandbox-notice");
    notice.hidden = false;
    notice.textContent = "No simulated channel yet (sandbox.json has no whatsapp, messenger, telegram or twilio integration).";
    $("phone-compose").querySelector("button").disabled = true;
  }

  // --- links into the phone ------------------------------------------------------------------------
  // wa.me, m.me, t.me and sms: links (the handoff) open the simulated phone of that channel
  // instead of the real app: WhatsApp and SMS get the prefilled text, an m.me ?ref= or a
  // t.me ?start= link is opened as the real app opens it (a referral, a /start payload).

  function linkAction(href) {
    let url;
    try { url = new URL(href); } catch (e) { return null; }
    const has = (kind) => channels.some((ch) => ch.kind === kind);
    if (has("whatsapp") && (url.hostname === "wa.me" || (url.hostname === "api.whatsapp.com" && url.pathname === "/send"))) {
      return {kind: "whatsapp", text: url.searchParams.get("text") || ""};
    }
    if (has("messenger") && (url.hostname === "m.me" || url.hostname === "www.m.me")) {
      const ref = url.searchParams.get("ref");
      return {kind: "messenger", spec: ref ? {ref} : null};
    }
    if (has("telegram") && (url.hostname === "t.me" || url.hostname === "telegram.me")) {
      const start = url.searchParams.get("start");
      return {kind: "telegram", spec: start !== null ? {start} : null};
    }
    if (has("twilio") && url.protocol === "sms:") {
      const body = url.searchParams.get("body") || new URLSearchParams(url.href.split("?")[1] || "").get("body");
      return {kind: "twilio", text: body || ""};
    }
    return null;
  }
  function follow(action) {
    select(action.kind, true);
    if (action.spec) sendAsCustomer(action.spec);
    else if (action.text !== undefined) { textInput.value = action.text; textInput.focus(); }
  }
  document.addEventListener("click", (event) => {
    for (const node of event.composedPath()) {
      if (node && node.tagName === "A" && node.href) {
        if (frame.contains(node)) return; // links inside the phone open normally
        const action = linkAction(node.href);
        if (action) { event.preventDefault(); follow(action); }
        return;
      }
    }
  }, true);
  const nativeOpen = window.open;
  window.open = function (url, ...rest) {
    const action = url ? linkAction(String(url)) : null;
    if (action) { follow(action); return null; }
    return nativeOpen.call(window, url, ...rest);
  };

  const params = new URLSearchParams(location.search);
  select(params.get("channel") || localStorage.getItem("sandbox.phone.channel") || "whatsapp", false);
  const initial = params.get("waText");
  if (initial) follow({kind: "whatsapp", text: initial});

  $("phone-compose").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = textInput.value.trim();
    if (!text || !current) return;
    textInput.value = "";
    sendAsCustomer({text});
  });
  setInterval(poll, 1000);
})();
