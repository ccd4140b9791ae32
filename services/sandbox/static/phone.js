// The simulated phone of the sandbox page: one phone frame, one tab per channel the sandbox has
// (WhatsApp, Messenger, Telegram, SMS, App). The chosen channel's phone polls its fake's thread for
// one customer and sends what is typed (or tapped) as that customer through the fake, which
// delivers a real, signed webhook to the gateway; its paper clip sends a photo or a document
// (uploaded to the sandbox, then delivered as that platform's media). The App phone is the
// business's own app instead: a client of the in-app SDK with push notifications (see `app` below).
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
  const identityRow = frame.querySelector(".phone-identity");
  const attachButton = $("phone-attach");
  const fileInput = $("phone-file");
  const businessName = config.businessName || "Threadline";

  // --- helpers ---------------------------------------------------------------------------------

  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    return node;
  }
  // The URL as the browser parses it when its scheme is one the phones may render (links: web,
  // sms: and tel:; images: web only), else null: what a business sent is never a javascript: link.
  const LINK_SCHEMES = ["http:", "https:", "sms:", "tel:"];
  const IMAGE_SCHEMES = ["http:", "https:"];
  function safeUrl(href, schemes) {
    if (typeof href !== "string" || !href) return null;
    let url;
    try { url = new URL(href, window.location.href); } catch (e) { return null; }
    return schemes.includes(url.protocol) ? url.href : null;
  }
  function link(href, text) {
    const safe = safeUrl(href, LINK_SCHEMES);
    if (!safe) return el("span", "", text); // shown, never followed
    const a = el("a", "", text);
    a.href = safe;
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
    attach: (files) => fakeAttach(files),
    items(data) {
      const items = (data.messages || []).map((m) => ({
        key: m.wamid, direction: m.direction, at: m.at,
        state: m.status + "|" + JSON.stringify(m.errors || []),
        render: (bubble) => (m.direction === "out" ? waOut(m.body, bubble) : waIn(m.body, bubble, m.media)),
        footer: (footer) => {
          if (m.status === "failed") footer.append(el("div", "failed", "not delivered: " + (((m.errors || [])[0] || {}).title || "")));
          const ticks = m.direction === "in" ? (m.status === "read" ? " ✓✓" : " ✓") : "";
          footer.append(el("span", "meta" + (m.status === "read" && m.direction === "in" ? " read" : ""), clock(m.at) + ticks));
        },
      }));
      // The business's typing indicator, under its name as WhatsApp shows it (the fake keeps it
      // until the business's next message, or 25 s).
      if (current && current.kind === "whatsapp") {
        $("phone-business").textContent = data.typing ? "typing…" : whatsapp.subtitle(current);
      }
      return items;
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
    } else if (type === "interactive") waInteractive(body.interactive, bubble);
    else bubble.append(el("div", "", "[" + type + "]"));
  }

  // Interactive messages as WhatsApp shows them; a tap sends what WhatsApp would (the fake's
  // /inbound turns it into the real webhook): a button_reply, a list_reply with the row id, a
  // location message for a location request. A CTA URL button is a link.
  const WA_SHARED_LOCATION = {latitude: 48.8584, longitude: 2.2945, name: "Shared location", address: "Champ de Mars, Paris"};
  function waInteractive(inter, bubble) {
    const action = inter.action || {};
    const header = inter.header || {};
    if (header.type === "image") renderImage((header.image || {}).link || "", "", bubble);
    else if (header.type === "text") bubble.append(el("div", "card-title", header.text));
    else if (header.type) bubble.append(el("div", "card-sub", "📎 " + header.type));
    if (inter.body) bubble.append(el("div", "", inter.body.text));
    if (inter.footer) bubble.append(el("div", "card-sub", inter.footer.text));
    const buttons = el("div", "buttons");
    if (inter.type === "button") {
      for (const b of action.buttons || []) {
        buttons.append(choiceButton(b.reply.title, () => sendAsCustomer({buttonReply: {id: b.reply.id, title: b.reply.title}})));
      }
    } else if (inter.type === "list") {
      const rows = el("div", "buttons");
      rows.hidden = true;
      for (const section of action.sections || []) {
        if (section.title) rows.append(el("div", "card-sub", section.title));
        for (const r of section.rows || []) {
          const row = choiceButton(r.title, () => sendAsCustomer({listReply: {id: r.id, title: r.title, description: r.description}}));
          if (r.description) row.append(el("div", "card-sub", r.description));
          rows.append(row);
        }
      }
      buttons.append(choiceButton("☰ " + action.button, () => { rows.hidden = !rows.hidden; }), rows);
    } else if (inter.type === "cta_url") {
      const params = action.parameters || {};
      buttons.append(link(params.url, "↗ " + params.display_text));
    } else if (inter.type === "location_request_message") {
      buttons.append(choiceButton("📍 Send location", () => sendAsCustomer({location: WA_SHARED_LOCATION})));
    } else bubble.append(el("div", "card-sub", "[" + inter.type + "]"));
    if (buttons.childNodes.length) bubble.append(buttons);
  }

  function waIn(body, bubble, media) {
    const file = (media || [])[0]; // a file this phone sent: the sandbox shows it from its upload
    if (body.type === "text") bubble.append(el("div", "", body.text.body));
    else if (body.type === "interactive") {
      const reply = body.interactive.button_reply || body.interactive.list_reply || {};
      bubble.append(el("div", "", reply.title || "[choice]"));
    } else if (body.type === "image" && file) {
      sentMedia(file, bubble);
      if (body.image.caption) bubble.append(el("div", "", body.image.caption));
    } else if (body.type === "image") bubble.append(el("div", "", "🖼 " + (body.image.caption || "image")));
    else if (body.type === "document") {
      const label = "📄 " + (body.document.filename || "document");
      bubble.append(file ? link(file.url, label) : el("div", "", label));
      if (body.document.caption) bubble.append(el("div", "", body.document.caption));
    }
    else if (body.type === "location") {
      const loc = body.location || {};
      bubble.append(el("div", "", "📍 " + (loc.name ? loc.name + " " : "") + loc.latitude + "," + loc.longitude));
    } else bubble.append(el("div", "", "[" + body.type + "]"));
  }

  const messenger = {
    label: "Messenger", who: "Messenger user", fromLabel: "Your PSID", defaultFrom: "7100000000000001",
    fromKey: "sandbox.phone.messenger.psid", placeholder: "Aa",
    title: (ch) => ch.pageName || businessName,
    subtitle: (ch) => "Messenger" + (ch.pageId ? " · m.me/" + ch.pageId : ""),
    address: (ch) => (ch.pageId ? "m.me/" + ch.pageId : ch.pageName),
    inbound: (from, name, spec) => Object.assign({from, name}, spec),
    attach: (files) => fakeAttach(files),
    items(data) {
      // The Page's sender actions: typing_on shows "typing…" under its name, mark_seen "Seen".
      const person = data.person || {};
      if (current && current.kind === "messenger") {
        $("phone-business").textContent = person.typing ? "typing…" : messenger.subtitle(current);
      }
      return (data.messages || []).map((m, index) => {
        const seen = m.direction === "in" && typeof person.seenAt === "number" && person.seenAt >= m.at;
        return {
          key: m.mid || "event-" + index + "-" + m.at, direction: m.direction, at: m.at,
          state: m.status + (seen ? "|seen" : ""),
          render: (bubble) => (m.direction === "out" ? msOut(m.body.message || {}, bubble) : msIn(m.body, bubble, m.media)),
          footer: (footer) => {
            footer.append(el("span", "meta" + (seen ? " read" : ""), clock(m.at) + (seen ? " · Seen" : "")));
          },
          quickReplies: m.direction === "out" ? ((m.body.message || {}).quick_replies || [])
            .filter((q) => q.content_type === "text")
            .map((q) => ({title: q.title, spec: {text: q.title, quickReply: q.payload}})) : [],
        };
      });
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
      } else if (b.type === "phone_number") {
        box.append(link("tel:" + b.payload, b.title));
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
      msCarousel(payload, bubble);
    } else if (payload.url) bubble.append(link(payload.url, "📎 " + attachment.type));
    else bubble.append(el("div", "", "[" + attachment.type + "]"));
  }

  // A generic template as Messenger shows it: a row of cards that scrolls sideways, each with its
  // image, title, subtitle and buttons (a postback button sends the real messaging_postbacks
  // webhook; a default_action makes the title open the link). Styled here: it is Messenger's alone.
  function msCarousel(payload, bubble) {
    Object.assign(bubble.style, {maxWidth: "100%", width: "100%", boxSizing: "border-box", padding: "0",
      background: "transparent"});
    const row = el("div", "ms-cards");
    Object.assign(row.style, {display: "flex", gap: "8px", overflowX: "auto", scrollSnapType: "x mandatory",
      whiteSpace: "normal", paddingBottom: "4px"});
    const ratio = payload.image_aspect_ratio === "square" ? "1 / 1" : "1.91 / 1";
    for (const element of payload.elements || []) {
      const card = el("div", "ms-card");
      Object.assign(card.style, {flex: "0 0 78%", scrollSnapAlign: "start", background: "#fff",
        border: "1px solid #dadde1", borderRadius: "14px", overflow: "hidden"});
      if (element.image_url) {
        renderImage(element.image_url, element.title, card);
        const img = card.lastChild;
        if (img && img.tagName === "IMG") {
          Object.assign(img.style, {width: "100%", aspectRatio: ratio, objectFit: "cover", borderRadius: "0"});
        }
      }
      const text = el("div");
      text.style.padding = "6px 10px 8px";
      const target = element.default_action ? element.default_action.url : null;
      const title = target ? link(target, element.title || "") : el("span", "", element.title || "");
      const titleLine = el("div", "card-title");
      titleLine.append(title);
      text.append(titleLine);
      if (element.subtitle) text.append(el("div", "card-sub", element.subtitle));
      if ((element.buttons || []).length) msButtons(element.buttons, text);
      card.append(text);
      row.append(card);
    }
    bubble.append(row);
  }

  function msIn(event, bubble, media) {
    if (event.message) {
      if (event.message.text) bubble.append(el("div", "", event.message.text));
      (event.message.attachments || []).forEach((a, index) => {
        const file = (media || [])[index]; // a file this phone sent: shown from its upload
        if (file && a.type === "image") sentMedia(file, bubble);
        else if (file) bubble.append(link(file.url, "📄 " + file.name));
        else bubble.append(el("div", "", "📎 " + a.type));
      });
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
    attach: (files) => fakeAttach(files),
    items(data) {
      // The bot's sendChatAction: "typing…" under its name while Telegram would show it.
      if (current && current.kind === "telegram") {
        $("phone-business").textContent = data.chatAction === "typing" ? "typing…" : telegram.subtitle(current);
      }
      return (data.messages || []).map((m) => {
        const msg = m.message || {};
        const pressed = m.callbackQuery;
        return {
          key: pressed ? "cb-" + pressed.id : (m.direction === "out" ? "out-" : "in-") + msg.message_id,
          direction: m.direction, at: m.at, state: "",
          render: (bubble) => {
            if (pressed) bubble.append(el("div", "pressed", tgButtonText(msg, pressed.data)));
            else tgMessage(msg, m.params || {}, bubble, m.media);
          },
          footer: (footer) => footer.append(el("span", "meta", clock(m.at) + (m.direction === "in" ? " ✓✓" : ""))),
          // A reply keyboard (not part of the Message: it is in the call's reply_markup) sits
          // under the input while it is the newest message's, as one_time_keyboard does.
          quickReplies: m.direction === "out" ? tgReplyKeyboard((m.params || {}).reply_markup) : [],
        };
      });
    },
    markRead() { /* bots never learn that a user read their messages */ },
  };

  // Where the phone is when "Share location" is tapped (the sandbox has no GPS).
  const TG_SANDBOX_LOCATION = {latitude: 52.520008, longitude: 13.404954};

  function tgReplyKeyboard(markup) {
    const buttons = [];
    for (const row of (markup || {}).keyboard || []) {
      for (const b of row) {
        const text = typeof b === "string" ? b : (b || {}).text;
        if (!text) continue;
        if (b.request_location) buttons.push({title: "📍 " + text, spec: {location: TG_SANDBOX_LOCATION}});
        else if (!Object.keys(b).some((k) => k.startsWith("request_") || k === "web_app")) {
          buttons.push({title: text, spec: {text}});
        }
      }
    }
    return buttons;
  }

  function tgButtonText(message, data) {
    for (const row of (message.reply_markup || {}).inline_keyboard || []) {
      for (const b of row) if (b.callback_data === data) return b.text;
    }
    return data;
  }

  function tgMessage(msg, params, bubble, media) {
    const file = (media || [])[0]; // a file this phone sent: shown from its upload
    if (msg.reply_to_message) {
      const quoted = msg.reply_to_message;
      bubble.append(el("div", "quote", quoted.text || quoted.caption || "[message]"));
    }
    if (msg.photo) {
      const source = typeof params.photo === "string" ? params.photo : "";
      if (source && /^https?:/.test(source)) renderImage(source, msg.caption || "photo", bubble);
      else if (file) sentMedia(file, bubble);
      else bubble.append(el("div", "", "🖼 photo"));
    }
    if (msg.document) {
      const label = "📄 " + (msg.document.file_name || "document");
      bubble.append(file ? link(file.url, label) : el("div", "", label));
    }
    if (msg.venue) bubble.append(el("div", "", "📍 " + msg.venue.title + ", " + msg.venue.address));
    else if (msg.location) bubble.append(el("div", "", "📍 " + msg.location.latitude + "," + msg.location.longitude));
    if (msg.text) bubble.append(el("div", "", msg.text));
    const rows = (msg.reply_markup || {}).inline_keyboard;
    if (msg.caption && msg.photo && rows && rows.length) {
      // A photo with a caption and buttons is how a carousel card arrives: shown as a card.
      const [title, ...rest] = msg.caption.split("\n");
      bubble.append(el("div", "card-title", title));
      if (rest.length) bubble.append(el("div", "card-sub", rest.join("\n")));
    } else if (msg.caption) bubble.append(el("div", "", msg.caption));
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
    attach: (files) => fakeAttach(files),
    items(data) {
      const messages = data.messages || [];
      // The choices the business's latest texts number ("1. Yes"): a tap answers with the number,
      // as a customer would type it.
      const answers = (data.choices || []).map((c) => ({title: c.number + ". " + c.label, spec: {text: String(c.number)}}));
      return messages.map((m, i) => ({
        key: m.sid, direction: m.direction, at: m.at, state: m.status + "|" + (m.errorCode || ""),
        quickReplies: i === messages.length - 1 ? answers : [],
        render: (bubble) => {
          const body = m.body || {};
          const media = m.direction === "out" ? (body.MediaUrl || [])
            : Object.keys(body).filter((k) => /^MediaUrl\d+$/.test(k)).map((k) => body[k]);
          media.forEach((url, index) => {
            const file = m.direction === "in" ? (m.media || [])[index] : null; // a file this phone sent
            if (m.direction === "out") renderImage(url, "MMS", bubble);
            else if (file && file.mediaType.startsWith("image/")) sentMedia(file, bubble);
            else if (file) bubble.append(link(file.url, "📄 " + file.name));
            else bubble.append(el("div", "", "🖼 picture"));
          });
          if (body.Body) bubble.append(smsText(body.Body));
        },
        footer: (footer) => {
          if (m.status === "failed" || m.status === "undelivered") footer.append(el("div", "failed", "not delivered (" + (m.errorCode || m.status) + ")"));
          // A long text is one message of several segments (each billed), as the handset joins them.
          footer.append(el("span", "meta", clock(m.at) + (m.segments > 1 ? " · " + m.segments + " segments" : "")));
        },
      }));
    },
    markRead() { /* SMS has no read receipts */ },
  };

  // An SMS body as a phone shows it: line breaks kept, web links tappable.
  function smsText(text) {
    const box = el("div");
    let last = 0;
    for (const match of text.matchAll(/https?:\/\/[^\s]+/g)) {
      if (match.index > last) box.append(document.createTextNode(text.slice(last, match.index)));
      box.append(link(match[0], match[0]));
      last = match.index + match[0].length;
    }
    if (last < text.length) box.append(document.createTextNode(text.slice(last)));
    return box;
  }


  // --- the App phone: the business's own Android app with Threadline's in-app SDK -----------------
  // Unlike the other phones this is no fake's thread: the simulated app is a client of the SDK
  // protocol (the `app` service under /app/v1): an install gets a device token from the sandbox's
  // fake FCM, starts a session with that device, and keeps the realtime socket open while the app
  // is open. Closing the app closes the socket, so the business's next reply is pushed through the
  // fake FCM: the lock screen polls that token's outbox and shows each push as a notification.

  const APP_VERSION = "1.0.0-sandbox";
  const APP_TYPING_MS = 10000; // a typing:start without its stop fades after this long
  const WEB_SCHEMES = ["http:", "https:"]; // what the app's link, webview and buy buttons may open
  // Where the phone is when the app shares its location (the sandbox has no GPS): WhatsApp's place.
  const APP_SHARED_LOCATION = {lat: WA_SHARED_LOCATION.latitude, long: WA_SHARED_LOCATION.longitude,
                               name: WA_SHARED_LOCATION.name, address: WA_SHARED_LOCATION.address};

  // What the app may attach: the types Threadline keeps (shared/media.py ALLOWED_TYPES), and the
  // app service's default limit (THREADLINE_SDK_MAX_UPLOAD_BYTES; a lower one answers 413).
  const APP_UPLOAD_TYPES = ["image/jpeg", "image/png", "image/gif", "image/webp", "application/pdf", "audio/mpeg",
    "audio/ogg", "audio/aac", "audio/mp4", "audio/amr", "video/mp4", "video/3gpp", "text/plain", "text/csv",
    "application/zip", "application/msword", "application/vnd.ms-excel", "application/vnd.ms-powerpoint",
    "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
    "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
    "application/vnd.openxmlformats-officedocument.presentationml.presentation"];
  const APP_UPLOAD_EXTENSIONS = {jpg: "image/jpeg", jpeg: "image/jpeg", png: "image/png", gif: "image/gif",
    webp: "image/webp", pdf: "application/pdf", mp3: "audio/mpeg", ogg: "audio/ogg", m4a: "audio/mp4",
    mp4: "video/mp4", txt: "text/plain", csv: "text/csv", zip: "application/zip",
    docx: "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
    xlsx: "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
    pptx: "application/vnd.openxmlformats-officedocument.presentationml.presentation"};
  const APP_MAX_UPLOAD_BYTES = 25 * 1024 * 1024;

  // The type a file is uploaded as, when it is one Threadline keeps; else null.
  function uploadType(file) {
    const name = String(file.name || "");
    const extension = name.includes(".") ? name.slice(name.lastIndexOf(".") + 1).toLowerCase() : "";
    const byName = Object.hasOwn(APP_UPLOAD_EXTENSIONS, extension) ? APP_UPLOAD_EXTENSIONS[extension] : undefined;
    const declared = String(file.type || "").split(";")[0].trim().toLowerCase();
    if (byName === "text/csv" || !declared) return byName || null;
    return APP_UPLOAD_TYPES.includes(declared) ? declared : null;
  }

  const app = (function () {
    let ch = null; // {integrationId, appId} of the App tab while it is shown
    let stored = {}; // {guid, token, session, closed, uninstalled, seenUpTo}, kept in localStorage
    let storedFor = null; // the storage key `stored` belongs to
    let messages = new Map(); // "c:<clientMessageId>" (customer) | "m:<id>" (business) → entry
    let cursor = null; // highest cursor seen on the socket: where a reopened app resumes
    let socket = null;
    let socketReady = false;
    let lastFrameAt = 0;
    let pingMs = 20000;
    let retryAt = 0; // no install, session or socket attempt before this time (back-off)
    let attempt = 0;
    let busy = false; // an install, session creation or outbox fetch is under way
    let businessReadAt = 0;
    let typingUntil = 0;
    let readSentCursor = 0;
    let notifications = []; // pushes that arrived while the app was closed, newest first
    let baselineNeeded = false; // the next outbox fetch marks what is there as seen
    let shownNotifications = "";
    let linkCode = null; // a handoff code the app was opened with: its next session joins that conversation

    const enc = encodeURIComponent;
    const storageKey = () => "sandbox.phone.app:" + ch.appId + ":" + ch.integrationId;
    function save() { localStorage.setItem(storedFor, JSON.stringify(stored)); }
    function load() {
      storedFor = storageKey();
      try { stored = JSON.parse(localStorage.getItem(storedFor) || "{}") || {}; } catch (e) { stored = {}; }
      if (typeof stored !== "object") stored = {};
    }

    function uuid() {
      if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
      // crypto.randomUUID needs a secure context; a LAN address over http is not one.
      const b = crypto.getRandomValues(new Uint8Array(16));
      b[6] = (b[6] & 15) | 64;
      b[8] = (b[8] & 63) | 128;
      const h = Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
      return h.slice(0, 8) + "-" + h.slice(8, 12) + "-" + h.slice(12, 16) + "-" + h.slice(16, 20) + "-" + h.slice(20);
    }

    const appPath = (path) => "/app/v1/apps/" + enc(ch.appId) + path;
    const fakePath = (path) => "/sandbox/android/" + enc(ch.integrationId) + path;

    async function call(url, method, body, token) {
      const headers = {};
      if (body !== undefined) headers["Content-Type"] = "application/json";
      if (token) headers.Authorization = "Bearer " + token;
      const response = await fetch(url, {method, headers, body: body !== undefined ? JSON.stringify(body) : undefined});
      const data = await response.json().catch(() => ({}));
      if (!response.ok) {
        const error = new Error(((data.errors || [])[0] || {}).title || ("HTTP " + response.status));
        error.status = response.status;
        throw error;
      }
      return data;
    }

    function backOff() {
      attempt += 1;
      retryAt = Date.now() + Math.min(10000, 500 * 2 ** Math.min(attempt, 5));
    }

    // --- install and session -------------------------------------------------------------------
    // An app session is pending until its first message, which creates the user and registers
    // this install (its device goes with that message). The session token expires: the app
    // renews it with its refresh token shortly before, or after a 401.

    const REFRESH_MARGIN_MS = 5 * 60 * 1000;
    const started = () => !!(stored.session && stored.session.conversationId);
    const needsRefresh = () => !!stored.session &&
      (stored.session.stale || (Date.parse(stored.session.expiresAt) || 0) - Date.now() < REFRESH_MARGIN_MS);

    function deviceBody() {
      return {guid: stored.guid, pushNotificationToken: stored.token, appVersion: APP_VERSION,
              info: {os: "Android", osVersion: "15", devicePlatform: "sandbox", appName: businessName}};
    }

    function keepSession(answer) {
      stored.session = {appUserId: answer.appUserId, clientId: answer.clientId, conversationId: answer.conversationId,
                        sessionToken: answer.sessionToken, refreshToken: answer.refreshToken,
                        expiresAt: answer.expiresAt};
      save();
    }

    // New tokens for the session; a refused refresh (the session ended) starts a new one.
    let refreshing = null;
    function refresh() {
      if (!refreshing) {
        const session = stored.session;
        refreshing = call(appPath("/sessions/refresh"), "POST", {refreshToken: session.refreshToken})
          .then((answer) => { if (stored.session === session) keepSession(answer); })
          .catch((e) => { if (e.status === 401 && stored.session === session) dropSession(); else throw e; })
          .finally(() => { refreshing = null; });
      }
      return refreshing;
    }

    async function install() {
      busy = true;
      const mine = ch;
      try {
        if (!stored.guid) { stored.guid = uuid(); save(); }
        if (!stored.token) {
          const device = await call(fakePath("/devices"), "POST", {name: "Sandbox phone"});
          if (mine !== ch) return;
          stored.token = device.token;
          save();
        }
        if (!stored.session || linkCode) {
          const code = linkCode;
          // A linked session joins an existing user: its install is registered at once.
          const body = code ? {linkCode: code, device: deviceBody()} : {};
          let session;
          try {
            session = await call(appPath("/integrations/" + enc(ch.integrationId) + "/sessions"), "POST", body);
          } catch (e) {
            // A used or expired code: the app keeps the session it had (if any).
            if (code && linkCode === code) { linkCode = null; e.message = "link not opened: " + e.message; }
            throw e;
          }
          if (mine !== ch) return;
          if (code) {
            // The linked session replaces the app's own: its socket, and the thread it showed.
            if (linkCode === code) linkCode = null;
            dropSocket();
            messages = new Map();
            cursor = null;
            readSentCursor = 0;
            businessReadAt = 0;
            typingUntil = 0;
          }
          keepSession(session);
        }
        attempt = 0;
        retryAt = 0;
        showError("");
      } catch (e) {
        if (mine === ch) { showError("App unavailable: " + e.message); backOff(); }
      } finally {
        busy = false;
      }
      if (mine === ch) tick();
    }

    // A session the service no longer accepts (secret rotated, integration removed): this
    // install starts over as a new anonymous user, with the same device.
    function dropSession() {
      stored.session = null;
      save();
      messages = new Map();
      cursor = null;
      readSentCursor = 0;
      businessReadAt = 0;
      show();
    }

    // --- the socket ----------------------------------------------------------------------------

    function connect() {
      const session = stored.session;
      let url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host +
        appPath("/conversations/" + enc(session.conversationId) + "/socket") + "?token=" + enc(session.sessionToken);
      if (cursor !== null) url += "&after=" + cursor;
      const ws = new WebSocket(url);
      socket = ws;
      socketReady = false;
      lastFrameAt = Date.now();
      let refusedWith = 0;
      ws.onmessage = (event) => {
        if (socket !== ws) return;
        lastFrameAt = Date.now();
        let frame;
        try { frame = JSON.parse(event.data); } catch (e) { return; }
        if (frame.type === "error") refusedWith = frame.status;
        else onFrame(frame);
      };
      ws.onclose = (event) => {
        if (socket !== ws) return;
        socket = null;
        socketReady = false;
        const code = event.code < 4000 && refusedWith ? 4000 + refusedWith : event.code;
        if (code === 4401 && stored.session) { stored.session.stale = true; retryAt = 0; }
        else if (code === 4404) { dropSession(); retryAt = 0; } else backOff();
        updateChrome();
      };
      updateChrome();
    }

    function dropSocket() {
      const ws = socket;
      socket = null;
      socketReady = false;
      if (ws) { try { ws.close(); } catch (e) { /* already closing */ } }
    }

    function onFrame(frame) {
      if (frame.type === "message") {
        if (typeof frame.cursor === "number" && (cursor === null || frame.cursor > cursor)) cursor = frame.cursor;
        const m = frame.message || {};
        const business = (m.author || {}).type === "business";
        const original = m.source && m.source.originalMessageId;
        const key = !business && original ? "c:" + original : "m:" + m.id;
        messages.set(key, {key, cursor: frame.cursor, message: m});
        if (business) typingUntil = 0;
        show();
        markRead();
      } else if (frame.type === "ready") {
        socketReady = true;
        attempt = 0;
        if (typeof frame.cursor === "number" && (cursor === null || frame.cursor > cursor)) cursor = frame.cursor;
        if (frame.pingInterval) pingMs = frame.pingInterval * 1000;
        if (frame.businessLastRead) businessReadAt = Math.max(businessReadAt, Date.parse(frame.businessLastRead) || 0);
        show();
        markRead();
      } else if (frame.type === "typing") {
        typingUntil = frame.active ? Date.now() + APP_TYPING_MS : 0;
        updateChrome();
      } else if (frame.type === "read") {
        businessReadAt = Math.max(businessReadAt, Date.parse(frame.at) || 0);
        show();
      }
      /* ping and delivery frames: the socket is alive, nothing to show */
    }

    // The customer has seen the business's messages: the business gets conversation:read.
    function markRead() {
      if (!socketReady || !started() || stored.closed || document.visibilityState !== "visible") return;
      let newest = 0;
      for (const entry of messages.values()) {
        if (entry.message && (entry.message.author || {}).type === "business" && entry.cursor > newest) newest = entry.cursor;
      }
      if (newest <= readSentCursor) return;
      readSentCursor = newest;
      const session = stored.session;
      call(appPath("/conversations/" + enc(session.conversationId) + "/activity"), "POST",
        {type: "conversation:read"}, session.sessionToken).catch((e) => {
        readSentCursor = 0;
        if (e.status === 401) session.stale = true;
      });
    }

    // --- sending -------------------------------------------------------------------------------
    // What the customer sends is one SDK message body (`PostMessage`): a typed text, a tap on a
    // reply or postback button (its label as text, with the button's payload), a shared location
    // or a form's answer. Each has its clientMessageId from the start, so tapping "Retry" on one
    // that did not get through posts the same message again (the service de-duplicates it). A
    // postback tap is `silent`: the business is told (conversation:postback), the history keeps
    // nothing, so it has no bubble; its button shows how the tap went.

    // The spec the phone's compose box, quick replies and buttons send, as the SDK body (without
    // its clientMessageId); null when there is nothing to send.
    function messageBody(spec) {
      if (spec.image) return {image: spec.image};
      if (spec.file) return {file: spec.file};
      if (spec.location) return {location: spec.location};
      if (spec.formResponse) return {formResponse: spec.formResponse};
      const text = String(spec.text || "").trim();
      if (!text) return null;
      return spec.payload ? {text, payload: String(spec.payload)} : {text};
    }

    async function send(spec) {
      const body = messageBody(spec);
      if (!body) return;
      if (!stored.session || stored.closed || stored.uninstalled) {
        showError("Not sent: the app is not open yet");
        if (spec.onDone) spec.onDone("refused");
        return;
      }
      const id = uuid();
      const entry = {key: "c:" + id, id, pending: {body, status: "sending", at: Date.now() / 1000,
                                                   silent: !!spec.silent, onDone: spec.onDone,
                                                   preview: spec.preview || null}};
      if (!spec.silent) {
        messages.set(entry.key, entry);
        show();
        scrollToNewest();
      }
      await post(entry);
    }

    // POST the entry's message (again, after a failure: the same clientMessageId).
    async function post(entry) {
      const p = entry.pending;
      p.status = "sending";
      show();
      try {
        if (needsRefresh()) await refresh();
        const now = stored.session;
        if (!now) throw new Error("the session ended");
        const body = Object.assign({clientMessageId: entry.id}, p.body);
        if (!started()) {
          // The first message: it creates the user, registers this install, and brings the session.
          keepSession(await call(appPath("/conversations"), "POST", Object.assign(body, {device: deviceBody()}),
            now.sessionToken));
        } else {
          await call(appPath("/conversations/" + enc(now.conversationId) + "/messages"), "POST", body,
            now.sessionToken);
        }
        p.status = "sent";
        showError("");
      } catch (e) {
        // Refused for what it says (not the session, not the rate): sending it again would not help.
        const refused = e.status >= 400 && e.status < 500 && ![401, 408, 429].includes(e.status);
        p.status = refused ? "refused" : "failed";
        showError("Not sent: " + e.message);
        if (e.status === 401 && stored.session) stored.session.stale = true;
      }
      if (p.onDone) p.onDone(p.status);
      show();
      tick();
    }

    // --- attachments ---------------------------------------------------------------------------
    // The paper clip: each file is checked (its type, its size), uploaded (POST …/attachments,
    // its progress in the thread), then sent as an image or a file message like anything else
    // the app sends. An upload cut off (the network, the service) is retried with "Retry".

    function attach(files) {
      if (!stored.session || stored.closed || stored.uninstalled) {
        showError("Not sent: the app is not open yet");
        return;
      }
      const refused = [];
      for (const file of files) {
        const name = String(file.name || "file");
        const type = uploadType(file);
        if (!type) refused.push("“" + name + "” can’t be sent: only photos, PDFs, audio, video, text, office documents and zip files.");
        else if (file.size > APP_MAX_UPLOAD_BYTES) refused.push("“" + name + "” is too large: at most 25 MB.");
        else if (!file.size) refused.push("“" + name + "” is empty.");
        else {
          const entry = {key: "u:" + uuid(), upload: {file, name, type, progress: 0, status: "uploading",
                                                     at: Date.now() / 1000}};
          messages.set(entry.key, entry);
          upload(entry);
        }
      }
      showError(refused.join(" "));
      show();
      scrollToNewest();
    }

    async function upload(entry) {
      const u = entry.upload;
      u.status = "uploading";
      u.progress = 0;
      show();
      let result;
      try {
        if (needsRefresh()) await refresh();
        const session = stored.session;
        if (!session) throw new Error("the session ended");
        result = await postFile(u, session.sessionToken);
      } catch (e) {
        result = {status: 0, body: null, reason: e.message};
      }
      const attachment = result.body && result.body.attachment;
      if (result.status === 201 && attachment && attachment.mediaUrl) {
        messages.delete(entry.key);
        const media = {mediaUrl: attachment.mediaUrl, mediaType: attachment.mediaType || u.type,
                       altText: u.name.slice(0, 512)};
        showError("");
        if (/^image\//.test(media.mediaType)) await send({image: media, preview: URL.createObjectURL(u.file)});
        else await send({file: media});
        return;
      }
      if (result.status === 401 && stored.session) stored.session.stale = true;
      const reason = (((result.body && result.body.errors) || [])[0] || {}).title || result.reason ||
        (result.status ? "HTTP " + result.status : "no connection");
      showError("Not sent: “" + u.name + "”: " + reason);
      // Refused for what it is (its type, its size): sending it again would not help.
      if (result.status >= 400 && result.status < 500 && ![401, 408, 429].includes(result.status)) messages.delete(entry.key);
      else u.status = "failed";
      show();
    }

    // POST the file (multipart, as `source`) with XMLHttpRequest, for its upload progress.
    function postFile(u, token) {
      return postWithProgress(appPath("/attachments"), {Authorization: "Bearer " + token}, "source", u, show);
    }

    // --- the lock screen -----------------------------------------------------------------------

    async function pollOutbox() {
      if (busy || !stored.token) return;
      busy = true;
      const mine = ch;
      try {
        const data = await call(fakePath("/outbox?to=" + enc(stored.token)), "GET");
        if (mine !== ch) return;
        const pushes = (data.messages || []).filter((p) => p && p.message);
        const newest = pushes.reduce((max, p) => Math.max(max, Number(p.receivedAt) || 0), stored.seenUpTo || 0);
        if (baselineNeeded) {
          baselineNeeded = false;
          stored.seenUpTo = newest;
          save();
        }
        // A newer notification with the same tag (the conversation) replaces the older one, as on Android.
        const byTag = new Map();
        for (const push of pushes) {
          if (!((Number(push.receivedAt) || 0) > (stored.seenUpTo || 0))) continue;
          const message = push.message;
          const tag = ((message.android || {}).notification || {}).tag || (message.data || {}).conversationId || push.name;
          const earlier = byTag.get(tag);
          byTag.set(tag, {push, count: earlier ? earlier.count + 1 : 1});
        }
        notifications = Array.from(byTag.values()).reverse();
      } catch (e) {
        /* the sandbox restarts; the next tick asks again */
      } finally {
        busy = false;
      }
      if (mine === ch) updateChrome();
    }

    function renderNotifications() {
      const list = $("phone-notifications");
      const signature = JSON.stringify(notifications.map((n) => [n.push.name, n.count]));
      if (signature === shownNotifications) return;
      shownNotifications = signature;
      list.textContent = "";
      for (const {push, count} of notifications) {
        const message = push.message;
        const note = message.notification || {};
        const item = el("li");
        const button = el("button", "lock-note");
        button.type = "button";
        button.dataset.messageId = (message.data || {}).messageId || "";
        const head = el("div", "note-head");
        head.append(el("span", "note-icon", (businessName || "?").charAt(0).toUpperCase()),
          el("span", "note-app", businessName), el("span", "note-time", clock(Number(push.receivedAt) || Date.now() / 1000)));
        button.append(head, el("div", "note-title", note.title || businessName), el("div", "note-body", note.body || ""));
        if (count > 1) button.append(el("div", "note-more", count + " new messages"));
        button.setAttribute("aria-label", "Notification: " + (note.title || "") + ": " + (note.body || ""));
        button.addEventListener("click", openApp);
        item.append(button);
        list.append(item);
      }
    }

    // --- app lifecycle -------------------------------------------------------------------------

    function openApp() {
      if (stored.uninstalled) {
        // Installing again is a new install: a new device token, a new anonymous user.
        stored = {};
        save();
        messages = new Map();
        cursor = null;
        readSentCursor = 0;
        businessReadAt = 0;
      }
      stored.closed = false;
      save();
      notifications = [];
      // What was pushed so far is seen now that the app shows the conversation.
      baselineNeeded = true;
      retryAt = 0;
      attempt = 0;
      show();
      tick();
    }

    function closeApp() {
      stored.closed = true;
      save();
      dropSocket();
      notifications = [];
      baselineNeeded = true;
      typingUntil = 0;
      tick();
    }

    async function uninstall() {
      const token = stored.token;
      dropSocket();
      try {
        if (token) await call(fakePath("/devices/" + enc(token) + "/revoke"), "POST", {});
      } catch (e) {
        if (e.status !== 404) { showError("Not uninstalled: " + e.message); return; }
      }
      stored = {uninstalled: true};
      save();
      messages = new Map();
      cursor = null;
      notifications = [];
      show();
    }

    function show() {
      if (current !== ch || !ch) return;
      render(items());
      syncForms();
      updateChrome();
    }

    function status() {
      if (stored.uninstalled) return "Not installed";
      if (!stored.session) return "Installing…";
      if (stored.closed) return "Closed · notifications on";
      return socketReady || !started() ? "Open · online" : "Open · connecting…";
    }

    function updateChrome() {
      if (current !== ch || !ch) return;
      const closed = !!stored.closed;
      $("phone-app-state").textContent = status();
      const toggle = $("phone-app-toggle");
      toggle.textContent = closed ? "Open app" : "Close app";
      toggle.disabled = !!stored.uninstalled;
      $("phone-app-uninstall").hidden = !!stored.uninstalled;
      const lock = $("phone-lock");
      lock.hidden = !(closed || stored.uninstalled);
      if (!lock.hidden) {
        const nowDate = new Date();
        $("phone-lock-time").textContent = nowDate.toLocaleTimeString([], {hour: "2-digit", minute: "2-digit"});
        $("phone-lock-date").textContent = nowDate.toLocaleDateString([], {weekday: "long", month: "long", day: "numeric"});
        if (stored.uninstalled) notifications = [];
        renderNotifications();
        $("phone-lock-empty").textContent = stored.uninstalled
          ? businessName + " is not installed on this phone."
          : (notifications.length ? "" : "No notifications. Reply as the business: the app gets a push.");
        $("phone-lock-open").textContent = stored.uninstalled ? "Install app" : "Open app";
      }
      const typing = !closed && typingUntil > Date.now();
      $("phone-business").textContent = typing ? "typing…" : app.subtitle();
    }

    function items() {
      const entries = Array.from(messages.values());
      // Confirmed messages in cursor order, then what is still on its way, in the order sent.
      const confirmed = entries.filter((e) => e.message).sort((a, b) => a.cursor - b.cursor);
      const pending = entries.filter((e) => !e.message);
      return confirmed.concat(pending).map(item);
    }

    function item(entry) {
      if (entry.upload) {
        const u = entry.upload;
        return {
          key: entry.key, direction: "in", at: u.at, state: u.status + ":" + u.progress,
          render: (bubble) => {
            bubble.dataset.type = "upload";
            bubble.append(el("span", "upload-name", u.name));
          },
          footer: (footer) => {
            if (u.status === "failed") {
              const line = el("div", "failed", "not sent · ");
              const again = choiceButton("Retry", () => { if (u.status === "failed") upload(entry); });
              again.className = "app-retry";
              line.append(again);
              footer.append(line);
              return;
            }
            const bar = el("progress");
            bar.max = 100;
            bar.value = u.progress;
            bar.setAttribute("aria-label", "Uploading " + u.name);
            footer.append(bar, el("span", "meta", "uploading… " + u.progress + "%"));
          },
        };
      }
      if (!entry.message) {
        const p = entry.pending;
        const media = p.body.image || p.body.file;
        return {
          // A picture or a file shows again once stored (its URL serves it only then): another key.
          key: media ? "p:" + entry.id : entry.key, direction: "in", at: p.at, state: p.status,
          render: (bubble) => (media ? pendingMedia(p, bubble) : appContent(sentContent(p.body), bubble, {}, false)),
          footer: (footer) => {
            if (p.status === "failed" || p.status === "refused") {
              const line = el("div", "failed", "not sent");
              if (p.status === "failed") {
                const again = choiceButton("Retry", () => { if (p.status === "failed") post(entry); });
                again.className = "app-retry";
                line.append(" · ", again);
              }
              footer.append(line);
            }
            footer.append(el("span", "meta", clock(p.at) + (p.status === "sent" ? " ✓" : p.status === "sending" ? " …" : "")));
          },
        };
      }
      const m = entry.message;
      const business = (m.author || {}).type === "business";
      const receivedMs = Date.parse(m.received) || Date.now();
      const read = !business && businessReadAt >= receivedMs;
      const content = m.content || {};
      return {
        key: entry.key, direction: business ? "out" : "in", at: receivedMs / 1000, state: read ? "read" : "ok",
        render: (bubble) => {
          if (business && (m.author || {}).displayName) bubble.append(el("div", "note", m.author.displayName));
          appContent(content, bubble, m, business);
        },
        footer: (footer) => {
          footer.append(el("span", "meta" + (read ? " read" : ""), clock(receivedMs / 1000) + (business ? "" : read ? " ✓✓" : " ✓")));
        },
        quickReplies: business ? appQuickReplies(content) : [],
      };
    }

    // An image or a file on its way: the picture from the phone's own copy, else its name.
    function pendingMedia(p, bubble) {
      const media = p.body.image || p.body.file;
      bubble.dataset.type = p.body.image ? "image" : "file";
      if (p.preview && /^blob:/.test(p.preview)) {
        const img = el("img");
        img.alt = media.altText || "photo";
        img.src = p.preview;
        bubble.append(img);
      } else bubble.append(el("div", "file-pending", "📄 " + (media.altText || "file")));
    }

    // What a message the app sent (or is sending) shows, as the content the history will have.
    function sentContent(body) {
      if (body.location) {
        const at = body.location;
        return {type: "location", coordinates: {lat: at.lat, long: at.long}, location: {name: at.name, address: at.address}};
      }
      if (body.formResponse) return {type: "formResponse", fields: body.formResponse.fields};
      return {type: "text", text: body.text};
    }

    // A message's content as the app shows it: text, media, a location (its name and address),
    // a carousel (cards scrolling sideways), a list, a form (answered inline), a form's answer
    // (`label: value` lines), and the business's buttons. DOM nodes and text only.
    function appContent(content, bubble, message, business) {
      const type = content.type || "text";
      bubble.dataset.type = type;
      if (type === "image") {
        renderImage(content.mediaUrl || "", content.altText || content.text || "", bubble);
        if (content.text) bubble.append(el("div", "", content.text));
      } else if (type === "file") {
        if (/^https?:/i.test(content.mediaUrl || "")) bubble.append(link(content.mediaUrl, "📄 " + (content.altText || content.text || "file")));
        else bubble.append(el("div", "", "📄 " + (content.text || "file")));
      } else if (type === "location") {
        const place = content.location || {};
        const at = content.coordinates || {};
        const lines = [place.name, place.address].filter((line) => typeof line === "string" && line);
        bubble.append(el("div", "", "📍 " + (lines.length ? lines.join("\n") : at.lat + "," + at.long)));
      } else if (type === "carousel" && Array.isArray(content.items)) {
        bubble.classList.add("app-wide");
        const row = el("div", "app-cards");
        row.tabIndex = 0; // scrolls sideways by keyboard too
        row.setAttribute("role", "group");
        row.setAttribute("aria-label", "Carousel");
        if ((content.displaySettings || {}).imageAspectRatio === "square") row.dataset.aspect = "square";
        for (const card of content.items) if (card) row.append(appItem(card, "app-card"));
        bubble.append(row);
      } else if (type === "list" && Array.isArray(content.items)) {
        const list = el("div", "app-list");
        for (const row of content.items) if (row) list.append(appItem(row, "app-list-item"));
        appActions(content.actions, list);
        bubble.append(list);
      } else if (type === "form" && Array.isArray(content.fields)) {
        bubble.append(appForm(content, message, business));
      } else if (type === "formResponse") {
        const fields = (Array.isArray(content.fields) ? content.fields : []).filter(Boolean);
        if (!fields.length) bubble.append(el("div", "", content.textFallback || "[form response]"));
        for (const f of fields) bubble.append(el("div", "", String(f.label || f.name || "") + ": " + answerValue(f)));
      } else if (type === "text") {
        bubble.append(el("div", "", content.text || ""));
      } else bubble.append(el("div", "", content.text || "[" + type + "]"));
      // Reply and location request buttons are quick replies under the message (appQuickReplies).
      if (business && (type === "text" || type === "image")) appActions(content.actions, bubble);
    }

    // A card of a carousel or a row of a list: its image, title, description and buttons.
    function appItem(entry, cls) {
      const card = el("div", cls);
      card.setAttribute("role", "group");
      card.setAttribute("aria-label", String(entry.title || ""));
      if (entry.mediaUrl) renderImage(entry.mediaUrl, entry.altText || entry.title || "", card);
      const body = el("div", "app-item-body");
      body.append(el("div", "card-title", String(entry.title || "")));
      if (entry.description) body.append(el("div", "card-sub", String(entry.description)));
      appActions(entry.actions, body);
      card.append(body);
      return card;
    }

    // The buttons that stay in the bubble: postbacks, and links (link, webview, buy) to web pages only.
    function appActions(actions, into) {
      const box = el("div", "buttons");
      for (const action of Array.isArray(actions) ? actions : []) {
        const node = action && appAction(action);
        if (node) box.append(node);
      }
      if (box.childNodes.length) into.append(box);
    }

    function appAction(action) {
      const text = typeof action.text === "string" ? action.text : "";
      let node = null;
      if (action.type === "postback" && text) node = postbackButton(action);
      else if ((action.type === "link" || action.type === "webview") && safeUrl(action.uri, WEB_SCHEMES)) {
        node = link(action.uri, text || action.uri);
      } else if (action.type === "buy") {
        // Without a web page to pay on (SunCo's own checkout), the offer is shown, not followed.
        if (safeUrl(action.uri, WEB_SCHEMES)) node = link(action.uri, buyLabel(action));
        else {
          node = el("span", "app-offer", buyLabel(action));
          node.setAttribute("aria-disabled", "true");
        }
      }
      if (node) node.dataset.action = action.type;
      return node;
    }

    // "Buy (€12.50)"
    function buyLabel(action) {
      const label = action.text || "Buy";
      if (typeof action.amount !== "number" || !(action.amount > 0)) return label;
      const currency = action.currency ? String(action.currency).toUpperCase() : "";
      let price = (action.amount / 100).toFixed(2) + (currency ? " " + currency : "");
      if (currency) {
        try {
          price = new Intl.NumberFormat(undefined, {style: "currency", currency}).format(action.amount / 100);
        } catch (e) { /* an unknown currency code: the plain figure */ }
      }
      return label + " (" + price + ")";
    }

    // A postback button: a tap posts its label with its payload, which the business hears of
    // (conversation:postback) and the history does not keep, so the button says how it went.
    function postbackButton(action) {
      const button = choiceButton(action.text, () => {
        if (button.getAttribute("aria-busy") === "true") return;
        button.setAttribute("aria-busy", "true");
        button.dataset.state = "sending";
        send({text: action.text, payload: action.payload || action.text, silent: true, onDone: (status) => {
          if (status === "sending") return;
          button.removeAttribute("aria-busy");
          button.dataset.state = status === "sent" ? "sent" : "failed";
        }});
      });
      return button;
    }

    // The business's reply buttons and location request, as chips under its newest message: a
    // reply posts its label with its payload, the location request a sample place (no GPS here).
    function appQuickReplies(content) {
      if (content.type && content.type !== "text" && content.type !== "image") return [];
      const replies = [];
      for (const action of Array.isArray(content.actions) ? content.actions : []) {
        if (action && action.type === "reply" && action.text) {
          replies.push({title: action.text, spec: {text: action.text, payload: action.payload || action.text}});
        } else if (action && action.type === "locationRequest") {
          replies.push({title: "📍 " + (action.text || "Share location"), spec: {location: APP_SHARED_LOCATION}});
        }
      }
      return replies;
    }

    // --- forms -----------------------------------------------------------------------------------
    // A form message is answered inline: Submit checks each field as the service will (so a
    // wrong answer is not queued and then dropped), posts the formResponse and shows the form
    // submitted with its answers. A form the customer answered before (the history has the
    // answer) shows submitted too.

    const EMAIL_ADDRESS = /^[^@\s<>"(),;:[\]\\]{1,64}@[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?\.[A-Za-z]{2,}$/;
    const formStates = new WeakMap(); // a form element → its setState(state, answers)
    let formCount = 0;

    // A field's answer in words: what follows "label: ".
    function answerValue(field) {
      if (field.type === "email") return String(field.email || "");
      if (field.type === "select") return (Array.isArray(field.select) ? field.select : []).map((o) => o && o.label).filter(Boolean).join(", ");
      return String(field.text || "");
    }

    function appForm(content, message, business) {
      formCount += 1;
      const form = el("form", "app-form");
      form.noValidate = true;
      form.dataset.formId = message.id || "";
      const rows = [];
      content.fields.forEach((field, index) => {
        if (!field || typeof field.name !== "string") return;
        const id = "app-form-" + formCount + "-" + index;
        const label = el("label", "", String(field.label || field.name));
        label.htmlFor = id;
        let input;
        if (field.type === "select") {
          input = el("select");
          const none = el("option", "", field.placeholder || "Choose…");
          none.value = "";
          input.append(none);
          (Array.isArray(field.options) ? field.options : []).forEach((option, i) => {
            if (!option || typeof option.name !== "string") return;
            const choice = el("option", "", String(option.label || option.name));
            choice.value = String(i);
            input.append(choice);
          });
        } else {
          input = el("input");
          input.type = field.type === "email" ? "email" : "text";
          input.placeholder = field.placeholder || "";
          input.autocomplete = field.type === "email" ? "email" : "off";
        }
        input.id = id;
        const row = el("div", "app-form-field");
        row.dataset.name = field.name;
        row.append(label, input);
        form.append(row);
        rows.push({field, input});
      });
      const error = el("div", "failed");
      error.hidden = true;
      error.setAttribute("role", "alert");
      const submit = el("button", "app-form-submit", "Submit");
      submit.type = "submit";
      form.append(error, submit);

      // open (editable) or submitted (disabled, with the answers when known).
      function setState(state, answers) {
        form.dataset.state = state;
        const byName = new Map((answers || []).filter((a) => a && typeof a.name === "string").map((a) => [a.name, a]));
        for (const {field, input} of rows) {
          input.disabled = state !== "open";
          const answer = byName.get(field.name);
          if (!answer) continue;
          if (field.type === "select") {
            const picked = (answer.select || [])[0] || {};
            const index = (Array.isArray(field.options) ? field.options : []).findIndex((o) => o && o.name === picked.name);
            if (index >= 0) input.value = String(index);
          } else input.value = answerValue(answer);
        }
        submit.disabled = state !== "open";
        submit.textContent = state === "open" ? "Submit" : "Submitted";
      }
      formStates.set(form, setState);
      if (!business || content.submitted === true) {
        setState("submitted", null);
        return form;
      }
      setState("open", null);
      form.addEventListener("submit", (event) => {
        event.preventDefault();
        if (form.dataset.state !== "open") return;
        const answers = [];
        for (const row of rows) {
          const problem = formAnswer(row, answers);
          if (problem) {
            error.textContent = problem;
            error.hidden = false;
            row.input.focus();
            return;
          }
        }
        error.hidden = true;
        error.textContent = "";
        setState("submitted", answers);
        // Refused (the service said what is wrong): the form opens again to be corrected.
        send({formResponse: {quotedMessageId: message.id, fields: answers},
              onDone: (status) => { if (status === "refused") setState("open", null); }});
      });
      return form;
    }

    // Adds one field's answer to `answers`; what is wrong with it, else null. Lengths count
    // code points, as the service does.
    function formAnswer({field, input}, answers) {
      const label = String(field.label || field.name);
      const answer = {type: field.type, name: field.name, label};
      if (field.type === "select") {
        const chosen = input.value === "" ? null : (Array.isArray(field.options) ? field.options : [])[Number(input.value)];
        if (!chosen) return "Please choose " + label + ".";
        answer.select = [{name: chosen.name, label: String(chosen.label || chosen.name)}];
      } else if (field.type === "email") {
        const email = input.value.trim();
        if (email.length > 128 || !EMAIL_ADDRESS.test(email)) return label + ": please enter an e-mail address.";
        answer.email = email;
      } else {
        const text = input.value.trim();
        const low = field.minSize || 1;
        const high = Math.min(field.maxSize || 128, 256);
        const size = Array.from(text).length;
        if (size < low) return label + (low > 1 ? ": at least " + low + " characters, please." : ": please fill this in.");
        if (size > high) return label + ": at most " + high + " characters, please.";
        answer.text = text;
      }
      answers.push(answer);
      return null;
    }

    // Forms shown open whose answer the thread has (sent from here before a reload, or
    // confirmed by the history) show as submitted with it.
    function syncForms() {
      const answers = new Map();
      for (const entry of messages.values()) {
        let fields = null;
        let formId = null;
        if (entry.message && (entry.message.author || {}).type !== "business" && (entry.message.content || {}).type === "formResponse") {
          fields = Array.isArray(entry.message.content.fields) ? entry.message.content.fields : [];
          formId = (fields.find((f) => f && f.quotedMessageId) || {}).quotedMessageId;
        } else if (entry.pending && entry.pending.body.formResponse && entry.pending.status !== "refused") {
          fields = entry.pending.body.formResponse.fields;
          formId = entry.pending.body.formResponse.quotedMessageId;
        }
        if (formId) answers.set(formId, fields);
      }
      for (const form of thread.querySelectorAll("form.app-form[data-state=open]")) {
        const setState = formStates.get(form);
        const fields = answers.get(form.dataset.formId);
        if (setState && fields) setState("submitted", fields);
      }
    }

    // The phone's periodic tick (and after every change): install, connect, watch the socket or
    // the lock screen.
    function tick() {
      if (!ch || current !== ch) return;
      updateChrome();
      if (stored.uninstalled) return;
      if (!stored.token || !stored.session || linkCode) {
        if (!busy && Date.now() >= retryAt) install();
        return;
      }
      if (stored.closed) {
        pollOutbox();
        return;
      }
      if (baselineNeeded) pollOutbox();
      if (!socket) {
        // Before the first message there is no conversation to listen to.
        if (!started() || Date.now() < retryAt) return;
        if (needsRefresh()) {
          if (!busy) {
            busy = true;
            refresh().catch(() => backOff()).finally(() => { busy = false; tick(); });
          }
          return;
        }
        connect();
      } else if (Date.now() - lastFrameAt > (socketReady ? pingMs * 2.5 : 10000)) {
        // A socket that went silent is dead even if not closed: resume from the cursor.
        dropSocket();
        backOff();
      }
    }

    $("phone-app-toggle").addEventListener("click", () => (stored.closed ? openApp() : closeApp()));
    $("phone-lock-open").addEventListener("click", openApp);
    $("phone-app-uninstall").addEventListener("click", uninstall);
    document.addEventListener("visibilitychange", () => { if (ch && current === ch) markRead(); });

    return {
      label: "App", who: "App user", fromLabel: "", defaultFrom: "", fromKey: "sandbox.phone.app.unused",
      placeholder: "Write a message…", hasIdentity: false,
      title: () => businessName,
      subtitle: () => "Android app · in-app messaging",
      address: () => businessName,
      addressLine: () => businessName + " in its own Android app",
      items,
      markRead() { /* the app marks read itself, over the SDK */ },
      send,
      attach,
      tick,
      activate(next) {
        ch = next;
        if (storedFor !== storageKey()) {
          load();
          messages = new Map();
          cursor = null;
          readSentCursor = 0;
          businessReadAt = 0;
        }
        shownNotifications = "";
        baselineNeeded = !stored.closed;
        retryAt = 0;
        attempt = 0;
        show();
        tick();
      },
      // A handoff link (`/handoff/v1/open?code=`) opened on this phone: the app opens (installed
      // again if it was not) and signs in with the code, joining the conversation it carries.
      openLink(code) {
        if (stored.uninstalled) {
          stored = {};
          messages = new Map();
          cursor = null;
        }
        linkCode = code;
        stored.closed = false;
        save();
        notifications = [];
        baselineNeeded = true;
        retryAt = 0;
        attempt = 0;
        show();
        tick();
      },
      deactivate() {
        // Another phone in front: this app goes to the background (its socket closes).
        dropSocket();
        ch = null;
        $("phone-lock").hidden = true;
      },
    };
  })();

  // --- the Mail tab ------------------------------------------------------------------------------
  // No phone app: the mail box of one address in the sandbox's SMTP sink (the e-mail notifications
  // and opt-in codes the gateway sends). A list of mails, newest first; a tap opens one, with its
  // links clickable. "Reply" answers a mail as the person's mail client would: the sandbox sends
  // the typed text above the quoted original over SMTP to the e-mail service's receiver (From this
  // address, To the mail's Reply-To), and shows what the receiver answered. Replies sent are in
  // the list too, marked "Sent".

  const mail = (function () {
    let openId = null; // the mail shown, or null: the list
    let replies = {enabled: false, reason: ""}; // whether the mail box can reply (the sandbox's config)
    const composing = new Map(); // mail id → the reply being typed (kept while the list refreshes)
    const outcomes = new Map(); // mail id → {ok, text}: how its last reply went

    function linkify(text, into) {
      let last = 0;
      for (const match of text.matchAll(/https?:\/\/[^\s<>"')\]]+/g)) {
        into.append(text.slice(last, match.index), link(match[0], match[0]));
        last = match.index + match[0].length;
      }
      into.append(text.slice(last));
    }

    function when(at) {
      const d = new Date(at * 1000);
      return d.toLocaleDateString([], {month: "short", day: "numeric"}) + " " + clock(at);
    }

    function senderName(from) {
      const m = /^\s*"?([^"<]*?)"?\s*<[^>]+>\s*$/.exec(from || "");
      return (m && m[1]) || from || "(unknown sender)";
    }

    const isSent = (m) => m.direction === "sent";
    const replyTarget = (m) => m.replyTo || (/<([^>]+)>/.exec(m.from || "") || [])[1] || m.from || "";
    const replySubject = (subject) => (/^\s*re\s*:/i.test(subject || "") ? subject : "Re: " + (subject || ""));

    function listView(mails, address) {
      const view = el("li", "mail-view");
      if (!mails.length) {
        view.append(el("p", "mail-empty", "No mail for " + address + " yet. E-mail notifications and codes sent to this address land here."));
        return view;
      }
      const list = el("ul", "mail-list");
      list.setAttribute("aria-label", "Mail box of " + address);
      for (const m of mails.slice().reverse()) {
        const row = el("button", "mail-row");
        row.type = "button";
        row.dataset.mailId = m.id;
        row.dataset.direction = isSent(m) ? "sent" : "received";
        const top = el("span", "mail-row-top");
        const who = el("strong", "", isSent(m) ? "To: " + (m.to || []).join(", ") : senderName(m.from));
        if (isSent(m)) top.append(el("span", "mail-tag", "Sent"));
        top.append(who, el("span", "meta", when(m.receivedAt)));
        row.append(top, el("span", "mail-subject", m.subject || "(no subject)"),
          el("span", "mail-snippet", (m.text || "").replace(/\s+/g, " ").slice(0, 90)));
        row.addEventListener("click", () => { openId = m.id; tick(); });
        const item = el("li");
        item.append(row);
        list.append(item);
      }
      view.append(list);
      return view;
    }

    function mailView(m, address) {
      const view = el("li", "mail-view mail-open");
      view.dataset.mailId = m.id;
      const back = el("button", "linkish mail-back", "← Mail box");
      back.type = "button";
      back.addEventListener("click", () => { openId = null; tick(); });
      const heading = el("h3", "mail-heading", m.subject || "(no subject)");
      if (isSent(m)) heading.prepend(el("span", "mail-tag", "Sent"), " ");
      const meta = el("div", "mail-meta");
      meta.append(el("div", "", "From: " + (m.from || "")), el("div", "", "To: " + (m.to || []).join(", ")));
      if (m.replyTo) meta.append(el("div", "", "Reply-To: " + m.replyTo));
      meta.append(el("div", "", "Date: " + (m.date || when(m.receivedAt))));
      const body = el("div", "mail-body");
      if (m.text) linkify(m.text, body);
      else if (m.html) {
        // HTML only: shown in a sandboxed frame (no scripts); its links open in a new tab.
        const frame = el("iframe", "mail-html");
        frame.setAttribute("sandbox", "allow-popups allow-popups-to-escape-sandbox");
        frame.title = "Mail content";
        frame.srcdoc = '<base target="_blank">' + m.html;
        body.append(frame);
      }
      view.append(back, heading, meta);
      if (!isSent(m)) view.append(replyBox(m, address));
      view.append(body);
      if (m.unsubscribe && /^https?:/i.test(m.unsubscribe)) {
        const footer = el("div", "mail-unsubscribe");
        footer.append(link(m.unsubscribe, "Unsubscribe"));
        view.append(footer);
      }
      return view;
    }

    // The Reply button, the reply form (To, Subject, the text) and how the last reply went.
    function replyBox(m, address) {
      const box = el("div", "mail-reply");
      const status = el("p", "mail-reply-status");
      status.setAttribute("role", "status");
      const shown = outcomes.get(m.id);
      if (shown) { status.textContent = shown.text; status.dataset.outcome = shown.ok ? "sent" : "failed"; }
      const open = el("button", "mail-reply-open", "Reply");
      open.type = "button";
      const form = el("form", "mail-compose");
      form.hidden = !composing.has(m.id);
      open.hidden = !form.hidden;
      if (!replies.enabled) {
        open.disabled = true;
        box.append(open, el("p", "mail-reply-off", replies.reason || "E-mail replies are off."), status);
        return box;
      }
      const fields = el("div", "mail-meta");
      fields.append(el("div", "", "From: " + address), el("div", "", "To: " + replyTarget(m)),
        el("div", "", "Subject: " + replySubject(m.subject)));
      const text = el("textarea", "mail-reply-text");
      text.rows = 4;
      text.setAttribute("aria-label", "Your reply");
      text.placeholder = "Write your reply…";
      text.value = composing.get(m.id) || "";
      text.addEventListener("input", () => composing.set(m.id, text.value));
      const send = el("button", "mail-reply-send", "Send");
      send.type = "submit";
      const cancel = el("button", "linkish mail-reply-cancel", "Cancel");
      cancel.type = "button";
      const actions = el("div", "mail-reply-actions");
      actions.append(send, cancel);
      form.append(fields, text, actions);
      open.addEventListener("click", () => {
        composing.set(m.id, composing.get(m.id) || "");
        form.hidden = false;
        open.hidden = true;
        text.focus();
      });
      cancel.addEventListener("click", () => {
        composing.delete(m.id);
        form.hidden = true;
        open.hidden = false;
      });
      form.addEventListener("submit", async (event) => {
        event.preventDefault();
        const typed = text.value;
        if (!typed.trim() || send.disabled) return;
        send.disabled = true;
        status.textContent = "Sending…";
        delete status.dataset.outcome;
        let outcome;
        try {
          const response = await fetch("/sandbox/mail/" + encodeURIComponent(m.id) + "/reply", {
            method: "POST", headers: {"Content-Type": "application/json"},
            body: JSON.stringify({text: typed, from: address})});
          const data = await response.json().catch(() => ({}));
          const smtp = data.smtp || {};
          if (response.ok && data.sent) {
            outcome = {ok: true, text: "Reply sent · the e-mail service answered " + (smtp.code || 250) + " " + (smtp.message || "")};
          } else if (smtp.code) {
            outcome = {ok: false, text: "Not delivered · the e-mail service answered " + smtp.code + " " + (smtp.message || "")};
          } else {
            outcome = {ok: false, text: "Not delivered · " + (smtp.message || ((data.errors || [])[0] || {}).title || "HTTP " + response.status)};
          }
        } catch (e) {
          outcome = {ok: false, text: "Not delivered · the sandbox did not answer"};
        }
        send.disabled = false;
        outcomes.set(m.id, outcome);
        status.textContent = outcome.text;
        status.dataset.outcome = outcome.ok ? "sent" : "failed";
        if (outcome.ok) {
          composing.delete(m.id);
          text.value = "";
          form.hidden = true;
          open.hidden = false;
        }
      });
      box.append(open, form, status);
      return box;
    }

    function show(view, signature) {
      const shown = thread.querySelector(".mail-view");
      if (shown && shown.dataset.signature === signature) return;
      view.dataset.signature = signature;
      thread.textContent = "";
      thread.append(view);
    }

    function tick() {
      const address = numberInput.value.trim();
      if (!address || !current || current.kind !== "mail") return;
      fetch("/sandbox/mail?to=" + encodeURIComponent(address)).then((r) => (r.ok ? r.json() : null)).then((data) => {
        if (!data || !current || current.kind !== "mail" || numberInput.value.trim() !== address) return;
        if (data.replies) replies = data.replies;
        const mails = data.mails || [];
        const open = openId && mails.find((m) => m.id === openId);
        if (open) show(mailView(open, address), "open:" + open.id + ":" + replies.enabled);
        else {
          openId = null;
          show(listView(mails, address), "list:" + address + ":" + mails.map((m) => m.id).join(","));
        }
        showError(data.listening === false ? "The sandbox SMTP sink is not listening (port taken?)." : "");
      }).catch(() => { /* the sandbox restarts; the next tick asks again */ });
    }

    return {
      label: "Mail", who: "E-mail customer", fromLabel: "Your address", defaultFrom: "ada@example.com",
      fromKey: "sandbox.phone.email", placeholder: "", hasName: false,
      title: () => "Mail",
      subtitle: (ch) => "Mail box · mail from " + (ch.fromAddress || businessName),
      address: (ch) => ch.fromAddress,
      addressLine: () => "a mail box: e-mail notifications to the address above land there, and you can reply",
      tick,
    };
  })();

  const ADAPTERS = {whatsapp, messenger, telegram, twilio, app, mail};
  const channels = (Array.isArray(config.channels) ? config.channels : [])
    .filter((ch) => ch && ADAPTERS[ch.kind] && ch.integrationId && (ch.kind !== "app" || ch.appId));
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
    lastItems = [];
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
    href = safeUrl(href, IMAGE_SCHEMES);
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
    if (adapter.send) return adapter.send(spec);
    const from = numberInput.value.trim();
    return api("/inbound", adapter.inbound(from, nameInput.value.trim(), spec))
      .then(() => { showError(""); return poll(); })
      .then(scrollToNewest)
      .catch((e) => showError("Not sent: " + e.message));
  }

  // --- photos and documents from the channel phones ------------------------------------------------
  // The paper clip of the WhatsApp, Messenger, Telegram and SMS phones: each file is checked
  // against what that platform takes (`config.attachments`: photo and document types and sizes),
  // uploaded to the sandbox (POST /sandbox/uploads, its progress in the thread), then sent by the
  // phone's fake ({"upload": id} to /inbound) as that platform's own webhook carrying it. An upload
  // or a send that did not get through can be retried; what the platform would refuse never leaves.

  const MEDIA_RULES = config.attachments || {};
  const MB = 1024 * 1024;
  let outgoing = []; // files on their way: {key, channel, from, name, file, type, photo, status, progress, uploadId?, reason?}
  let lastItems = []; // what the fake's thread showed at the last poll

  const shortType = (type) => ({"image/jpeg": "jpeg", "image/png": "png", "image/gif": "gif", "image/webp": "webp",
    "application/pdf": "pdf", "text/plain": "text", "text/csv": "csv", "application/zip": "zip"})[type] || null;
  function typeList(types) {
    const names = Array.from(new Set(types.map((t) => shortType(t) || "office")));
    return names.join(", ");
  }

  function fakeAttach(files) {
    const rule = current ? MEDIA_RULES[current.kind] : null;
    const from = numberInput.value.trim();
    if (!rule || !from) {
      showError("Not sent: " + (rule ? "enter the sender first" : "this phone sends no files"));
      return;
    }
    const refused = [];
    for (const file of files) {
      const name = String(file.name || "file");
      const type = uploadType(file);
      const photo = !!type && rule.photoTypes.includes(type);
      const limit = photo ? rule.maxPhotoBytes : rule.maxDocumentBytes;
      if (!type || (!photo && !rule.documentTypes.includes(type))) {
        refused.push("“" + name + "” can’t be sent on " + adapter.label + ": photos (" + typeList(rule.photoTypes) +
          ") and documents (" + typeList(rule.documentTypes) + ") only.");
      } else if (!file.size) refused.push("“" + name + "” is empty.");
      else if (file.size > limit) {
        refused.push("“" + name + "” is too large for " + adapter.label + ": a " + (photo ? "photo" : "document") +
          " is at most " + Math.floor(limit / MB) + " MB.");
      } else {
        const entry = {key: "up:" + Date.now().toString(36) + Math.random().toString(36).slice(2), channel: current,
                       phone: adapter, from, name, file, type, photo, status: "uploading", progress: 0,
                       at: Date.now() / 1000, preview: photo ? URL.createObjectURL(file) : null};
        outgoing.push(entry);
        sendFile(entry);
      }
    }
    showError(refused.join(" "));
    redraw();
    scrollToNewest();
  }

  // Upload the file (unless it already is), then have the phone send it; the thread shows how it goes.
  async function sendFile(entry) {
    entry.reason = "";
    if (!entry.uploadId) {
      entry.status = "uploading";
      entry.progress = 0;
      redraw();
      const result = await postUpload(entry);
      const upload = result.body && result.body.upload;
      if (result.status !== 201 || !upload) {
        failed(entry, result.status, (((result.body && result.body.errors) || [])[0] || {}).title ||
          (result.status ? "HTTP " + result.status : "no connection"));
        return;
      }
      entry.uploadId = upload.id;
    }
    entry.status = "sending";
    redraw();
    const ch = entry.channel;
    let status = 0;
    let reason = "";
    try {
      const response = await fetch("/sandbox/" + ch.kind + "/" + encodeURIComponent(ch.integrationId) + "/inbound", {
        method: "POST", headers: {"Content-Type": "application/json"},
        body: JSON.stringify(entry.phone.inbound(entry.from, nameInput.value.trim(), {upload: entry.uploadId}))});
      status = response.status;
      const data = await response.json().catch(() => ({}));
      reason = ((data.errors || [])[0] || {}).title || "HTTP " + status;
    } catch (e) {
      reason = "no connection";
    }
    if (status !== 200) { failed(entry, status, reason); return; }
    outgoing = outgoing.filter((e) => e !== entry);
    if (entry.preview) URL.revokeObjectURL(entry.preview);
    showError("");
    poll();
  }

  function failed(entry, status, reason) {
    showError("Not sent: “" + entry.name + "”: " + reason);
    // Refused for what it is (its type, its size): sending it again would not help.
    if (status >= 400 && status < 500 && ![408, 429].includes(status)) {
      outgoing = outgoing.filter((e) => e !== entry);
      if (entry.preview) URL.revokeObjectURL(entry.preview);
    } else {
      entry.status = "failed";
      entry.reason = reason;
    }
    redraw();
  }

  // POST a file (multipart, in `field`) with XMLHttpRequest, for its upload progress: `entry`
  // ({file, type, name}) gets `progress` (0-100), `redraw` shows it; resolves {status, body}.
  function postWithProgress(url, headers, field, entry, redraw) {
    return new Promise((resolve) => {
      const xhr = new XMLHttpRequest();
      xhr.open("POST", url);
      for (const [name, value] of Object.entries(headers)) xhr.setRequestHeader(name, value);
      xhr.upload.onprogress = (event) => {
        if (!event.lengthComputable || !event.total) return;
        entry.progress = Math.round(event.loaded * 100 / event.total);
        redraw();
      };
      xhr.onload = () => {
        let body = null;
        try { body = JSON.parse(xhr.responseText); } catch (e) { /* the status says enough */ }
        resolve({status: xhr.status, body});
      };
      xhr.onerror = xhr.onabort = xhr.ontimeout = () => resolve({status: 0, body: null});
      const form = new FormData();
      form.append(field, new Blob([entry.file], {type: entry.type}), entry.name);
      xhr.send(form);
    });
  }

  function postUpload(entry) {
    return postWithProgress("/sandbox/uploads", {}, "file", entry, redraw);
  }

  // The files on their way from the phone shown now, as thread items after the fake's own.
  function outgoingItems() {
    const from = numberInput.value.trim();
    return outgoing.filter((e) => e.channel === current && e.from === from).map((e) => ({
      key: e.key, direction: "in", at: e.at, state: e.status + ":" + e.progress,
      render: (bubble) => {
        bubble.dataset.type = "upload";
        if (e.preview) {
          const img = el("img");
          img.alt = e.name;
          img.src = e.preview;
          bubble.append(img);
        }
        bubble.append(el("span", "upload-name", (e.photo ? "" : "📄 ") + e.name));
      },
      footer: (footer) => {
        if (e.status === "failed") {
          const line = el("div", "failed", "not sent" + (e.reason ? " (" + e.reason + ")" : "") + " · ");
          const again = choiceButton("Retry", () => { if (e.status === "failed") sendFile(e); });
          again.className = "app-retry";
          line.append(again);
          footer.append(line);
          return;
        }
        if (e.status === "sending") {
          footer.append(el("span", "meta", "sending…"));
          return;
        }
        const bar = el("progress");
        bar.max = 100;
        bar.value = e.progress;
        bar.setAttribute("aria-label", "Uploading " + e.name);
        footer.append(bar, el("span", "meta", "uploading… " + e.progress + "%"));
      },
    }));
  }

  // Draw the thread again with what is on its way (a fake phone's; the App and Mail tabs draw their own).
  function redraw() {
    if (!current || adapter.tick || adapter.activate) return;
    render(lastItems.concat(outgoingItems()));
  }

  // A file this phone sent, as the phone shows it: the picture, else its name as a link.
  function sentMedia(file, bubble) {
    if (String(file.mediaType || "").startsWith("image/")) renderImage(file.url, file.name || "photo", bubble);
    else bubble.append(link(file.url, "📄 " + (file.name || "file")));
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
    // Keyed by what a tap sends too: the same titles with other payloads are other chips.
    const signature = JSON.stringify([last ? last.key : null, replies.map((r) => [r.title, r.spec])]);
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
    if (current && adapter.tick) { adapter.tick(); return; }
    if (!current || !numberInput.value.trim()) return;
    const mine = generation;
    const from = numberInput.value.trim();
    try {
      const data = await api("/thread?to=" + encodeURIComponent(from));
      if (mine !== generation) return;
      lastItems = adapter.items(data);
      render(lastItems.concat(outgoingItems()));
      if (document.visibilityState === "visible") adapter.markRead(data, api, from);
    } catch (e) { /* the sandbox restarts, or this sender has no thread yet; try again on the next tick */ }
  }

  // --- tabs ------------------------------------------------------------------------------------------

  function select(kind, remember) {
    const next = channels.find((ch) => ch.kind === kind) || channels[0];
    if (!next) return;
    if (current && current.kind === next.kind) return;
    if (current && adapter.deactivate) adapter.deactivate();
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
    identityRow.hidden = adapter.hasIdentity === false;
    $("phone-app-bar").hidden = !adapter.activate;
    attachButton.hidden = !adapter.attach || (adapter !== app && !MEDIA_RULES[next.kind]);
    const rule = MEDIA_RULES[next.kind];
    fileInput.accept = adapter === app ? APP_UPLOAD_TYPES.join(",") : (rule ? rule.photoTypes.concat(rule.documentTypes).join(",") : "");
    $("phone-number-label").textContent = adapter.fromLabel;
    frame.setAttribute("aria-label", "Simulated " + adapter.label + " phone");
    textInput.placeholder = adapter.placeholder;
    textInput.setAttribute("aria-label", adapter.label + " message");
    numberInput.value = localStorage.getItem(adapter.fromKey) || adapter.defaultFrom;
    const address = $("channel-address");
    if (address) address.textContent = adapter.addressLine ? adapter.addressLine(next)
      : (adapter.address(next) || "the business") + " on " + adapter.label;
    resetThread();
    if (adapter.activate) adapter.activate(next);
    else poll();
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
    notice.textContent = "No simulated channel yet (sandbox.json has no whatsapp, messenger, telegram, twilio or android integration).";
    $("phone-compose").querySelector("button[type=submit]").disabled = true;
  }

  // --- links into the phone ------------------------------------------------------------------------
  // wa.me, m.me, t.me and sms: links (the handoff) open the simulated phone of that channel
  // instead of the real app: WhatsApp and SMS get the prefilled text, an m.me ?ref= or a
  // t.me ?start= link is opened as the real app opens it (a referral, a /start payload). The app
  // integration's link (the gateway's /handoff/v1/open?code=, what an App Link would open) opens
  // the App phone, which signs in with the code.

  const HANDOFF_OPEN_PATH = "/handoff/v1/open";
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
    const code = url.searchParams.get("code");
    if (has("app") && /^https?:$/.test(url.protocol) && url.pathname === HANDOFF_OPEN_PATH && code) {
      return {kind: "app", linkCode: code};
    }
    if (has("twilio") && url.protocol === "sms:") {
      const body = url.searchParams.get("body") || new URLSearchParams(url.href.split("?")[1] || "").get("body");
      return {kind: "twilio", text: body || ""};
    }
    return null;
  }
  function follow(action) {
    select(action.kind, true);
    if (action.linkCode) app.openLink(action.linkCode);
    else if (action.spec) sendAsCustomer(action.spec);
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

  attachButton.addEventListener("click", () => fileInput.click());
  fileInput.addEventListener("change", () => {
    const files = Array.from(fileInput.files || []);
    fileInput.value = "";
    if (current && adapter.attach) adapter.attach(files);
  });

  $("phone-compose").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = textInput.value.trim();
    if (!text || !current) return;
    textInput.value = "";
    sendAsCustomer({text});
  });
  setInterval(poll, 1000);
})();
