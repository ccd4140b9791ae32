// The simulated WhatsApp phone of the sandbox page: polls the fake's thread for one customer
// number and sends what is typed as that customer (through the fake, which signs a real webhook).
(function () {
  "use strict";
  const config = window.SANDBOX || {};
  const integrationId = config.whatsappIntegrationId;
  const $ = (id) => document.getElementById(id);
  const thread = $("phone-thread");
  const numberInput = $("phone-number");
  const nameInput = $("phone-name");
  const textInput = $("phone-text");
  const readSent = new Set();
  // Rendered bubbles by message id: a poll only adds new bubbles and updates statuses, so images
  // are not fetched again and the scroll position holds.
  let bubbles = new Map();
  // Image links that failed once: shown as a placeholder from then on, never fetched again.
  const brokenImages = new Set();

  numberInput.value = localStorage.getItem("sandbox.phone.number") || numberInput.value;
  nameInput.value = localStorage.getItem("sandbox.phone.name") || nameInput.value;
  numberInput.addEventListener("change", () => { localStorage.setItem("sandbox.phone.number", numberInput.value); resetThread(); poll(); });
  nameInput.addEventListener("change", () => localStorage.setItem("sandbox.phone.name", nameInput.value));
  if (config.whatsappNumber) $("phone-business").textContent = "WhatsApp business · " + config.whatsappNumber;

  if (!integrationId) {
    const notice = $("sandbox-notice");
    notice.hidden = false;
    notice.textContent = "No WhatsApp sandbox integration yet (sandbox.json has no integrations.whatsapp.id).";
  }

  // wa.me links (the handoff) open the simulated phone with the prefilled text instead of WhatsApp.
  function waText(href) {
    try {
      const url = new URL(href);
      if (url.hostname === "wa.me" || (url.hostname === "api.whatsapp.com" && url.pathname === "/send")) {
        return url.searchParams.get("text") || "";
      }
    } catch (e) { /* not a URL */ }
    return null;
  }
  function prefill(text) { textInput.value = text; textInput.focus(); }
  document.addEventListener("click", (event) => {
    for (const el of event.composedPath()) {
      if (el && el.tagName === "A" && el.href) {
        const text = waText(el.href);
        if (text !== null) { event.preventDefault(); prefill(text); }
        return;
      }
    }
  }, true);
  const nativeOpen = window.open;
  window.open = function (url, ...rest) {
    const text = url ? waText(String(url)) : null;
    if (text !== null) { prefill(text); return null; }
    return nativeOpen.call(window, url, ...rest);
  };
  const initial = new URLSearchParams(location.search).get("waText");
  if (initial) prefill(initial);

  async function api(path, body) {
    const response = await fetch("/sandbox/whatsapp/" + encodeURIComponent(integrationId) + path, {
      method: body ? "POST" : "GET",
      headers: body ? {"Content-Type": "application/json"} : {},
      body: body ? JSON.stringify(body) : undefined,
    });
    return response.json();
  }

  function sendAsCustomer(spec) {
    return api("/inbound", Object.assign({from: numberInput.value, name: nameInput.value}, spec))
      .then(poll).then(scrollToNewest);
  }

  // Whether the thread shows its end: content that grows later (an image loading, a placeholder)
  // keeps the newest message in view then, but does not yank a reader who scrolled up.
  let pinned = true;
  const atEnd = () => thread.scrollTop + thread.clientHeight >= thread.scrollHeight - 4;
  thread.addEventListener("scroll", () => { pinned = atEnd(); });
  function scrollToNewest() { thread.scrollTop = thread.scrollHeight; pinned = true; }

  function resetThread() {
    bubbles = new Map();
    thread.textContent = "";
  }

  // An icon drawn inline: no emoji font needed for the placeholder.
  const PICTURE_ICON = '<svg width="16" height="16" viewBox="0 0 24 24" aria-hidden="true"><path fill="currentColor" ' +
    'd="M21 5v14H3V5h18m0-2H3a2 2 0 0 0-2 2v14a2 2 0 0 0 2 2h18a2 2 0 0 0 2-2V5a2 2 0 0 0-2-2zm-7.5 9.5L11 ' +
    '15.5l-2-2.5-3 4h12l-3.5-4.5z"/></svg>';
  function imagePlaceholder() {
    const box = el("div", "img-missing");
    box.innerHTML = PICTURE_ICON;
    box.append(el("span", "", "image unavailable"));
    return box;
  }

  function renderImage(link, caption, bubble) {
    if (!link || brokenImages.has(link)) {
      bubble.append(imagePlaceholder());
      return;
    }
    const img = el("img");
    img.alt = caption || "image";
    img.addEventListener("error", () => {
      brokenImages.add(link);
      const wasPinned = pinned;
      img.replaceWith(imagePlaceholder());
      if (wasPinned) scrollToNewest();
    }, {once: true});
    img.addEventListener("load", () => { if (pinned) scrollToNewest(); }, {once: true});
    img.src = link;
    bubble.append(img);
  }

  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function renderOut(body, bubble) {
    const type = body.type || "text";
    if (type === "text") bubble.append(el("div", "", body.text.body));
    else if (type === "image") {
      renderImage(body.image.link || "", body.image.caption || "", bubble);
      if (body.image.caption) bubble.append(el("div", "", body.image.caption));
    } else if (type === "document") {
      const a = el("a", "", "📄 " + (body.document.filename || "document")); a.href = body.document.link; a.target = "_blank";
      bubble.append(a);
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
        const button = el("button", "", choice.title);
        button.addEventListener("click", () => sendAsCustomer({[choice.kind]: {id: choice.id, title: choice.title}, contextId: undefined}));
        buttons.append(button);
      }
      bubble.append(buttons);
    } else bubble.append(el("div", "", "[" + type + "]"));
  }

  function renderIn(body, bubble) {
    if (body.type === "text") bubble.append(el("div", "", body.text.body));
    else if (body.type === "interactive") {
      const reply = body.interactive.button_reply || body.interactive.list_reply || {};
      bubble.append(el("div", "", reply.title || "[choice]"));
    } else if (body.type === "image") bubble.append(el("div", "", "🖼 " + (body.image.caption || "image")));
    else bubble.append(el("div", "", "[" + body.type + "]"));
  }

  function renderStatus(m, footer) {
    footer.textContent = "";
    if (m.status === "failed") footer.append(el("div", "failed", "not delivered: " + (((m.errors || [])[0] || {}).title || "")));
    const time = new Date(m.at * 1000).toLocaleTimeString([], {hour: "2-digit", minute: "2-digit"});
    const ticks = m.direction === "in" ? (m.status === "read" ? " ✓✓" : " ✓") : "";
    footer.append(el("span", "meta" + (m.status === "read" && m.direction === "in" ? " read" : ""), time + ticks));
  }

  function render(messages) {
    let added = false;
    let previous = null;
    const current = new Set();
    for (const m of messages) {
      current.add(m.wamid);
      let entry = bubbles.get(m.wamid);
      if (!entry) {
        const bubble = el("li", "bubble " + m.direction);
        bubble.dataset.wamid = m.wamid;
        if (m.direction === "out") renderOut(m.body, bubble); else renderIn(m.body, bubble);
        const footer = el("div", "footer");
        bubble.append(footer);
        entry = {bubble, footer, status: null};
        bubbles.set(m.wamid, entry);
        thread.insertBefore(bubble, previous ? previous.nextSibling : thread.firstChild);
        added = true;
      }
      const status = m.status + "|" + JSON.stringify(m.errors || []);
      if (entry.status !== status) {
        renderStatus(m, entry.footer);
        entry.status = status;
      }
      previous = entry.bubble;
    }
    for (const [wamid, entry] of bubbles) {
      if (!current.has(wamid)) { entry.bubble.remove(); bubbles.delete(wamid); }
    }
    // A new message (either side, a button reply included) brings the newest into view.
    if (added) scrollToNewest();
  }

  async function markRead(messages) {
    if (document.visibilityState !== "visible") return;
    for (const m of messages) {
      if (m.direction === "out" && m.status !== "read" && m.status !== "failed" && !readSent.has(m.wamid)) {
        readSent.add(m.wamid);
        api("/status", {wamid: m.wamid, status: "read"}).catch(() => readSent.delete(m.wamid));
      }
    }
  }

  async function poll() {
    if (!integrationId || !numberInput.value) return;
    try {
      const data = await api("/thread?to=" + encodeURIComponent(numberInput.value));
      render(data.messages || []);
      markRead(data.messages || []);
    } catch (e) { /* the sandbox restarts; try again on the next tick */ }
  }

  $("phone-compose").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = textInput.value.trim();
    if (!text || !integrationId) return;
    textInput.value = "";
    sendAsCustomer({text});
  });
  setInterval(poll, 1000);
  poll();
})();
