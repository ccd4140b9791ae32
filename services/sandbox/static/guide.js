// The "reply as the business" guide of the sandbox page: a copy-paste curl built from sandbox.json
// (base URL, app id, key id; the secret is read from the file by the command itself) and, once the
// visitor has chatted in the widget, that widget conversation's id.
(function () {
  "use strict";
  const config = window.SANDBOX || {};
  const $ = (id) => document.getElementById(id);
  const baseUrl = (config.baseUrl || location.origin).replace(/\/+$/, "");
  const sandboxFile = config.sandboxFile || "<data-dir>/sandbox.json";
  const shellQuote = (value) => "'" + String(value).replace(/'/g, "'\\''") + "'";

  $("sandbox-file").textContent = sandboxFile;

  // The widget keeps its session (with the conversation id) in localStorage under this key.
  function widgetConversationId() {
    if (!config.appId || !config.webIntegrationId) return null;
    try {
      const state = JSON.parse(localStorage.getItem("threadline:" + config.appId + ":" + config.webIntegrationId) || "null");
      const id = state && state.session && state.session.conversationId;
      return typeof id === "string" && id ? id : null;
    } catch (e) {
      return null;
    }
  }

  let shown = undefined;
  function renderCurl() {
    const conversationId = widgetConversationId();
    if (conversationId === shown) return;
    shown = conversationId;
    const appId = config.appId || "APP_ID";
    const keyId = config.keyId || "KEY_ID";
    const body = JSON.stringify({author: {type: "business", displayName: "Support"},
      content: {type: "text", text: "Hi! How can we help?"}});
    $("curl").textContent = [
      "KEY_SECRET=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[\"apiKey\"][\"secret\"])' " +
        shellQuote(sandboxFile) + ")",
      "CONVERSATION_ID=" + (conversationId || "PASTE_A_CONVERSATION_ID"),
      "curl -sS -u " + shellQuote(keyId) + '":$KEY_SECRET" \\',
      "  -H 'Content-Type: application/json' \\",
      "  -d " + shellQuote(body) + " \\",
      '  "' + baseUrl + "/v2/apps/" + appId + '/conversations/$CONVERSATION_ID/messages"',
    ].join("\n");
    $("widget-conversation-hint").textContent = conversationId
      ? "The conversation of the chat bubble on this page is filled in below."
      : "Send a message in the chat bubble and its conversation id is filled in below.";
  }

  $("copy-curl").addEventListener("click", () => {
    const text = $("curl").textContent;
    const done = () => { $("copy-curl").textContent = "Copied"; setTimeout(() => { $("copy-curl").textContent = "Copy"; }, 1500); };
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(text).then(done, () => selectCurl());
    } else {
      selectCurl();
    }
  });
  function selectCurl() {
    const range = document.createRange();
    range.selectNodeContents($("curl"));
    const selection = window.getSelection();
    selection.removeAllRanges();
    selection.addRange(range);
  }

  renderCurl();
  // The widget creates its session when the visitor first writes; pick the id up then.
  setInterval(renderCurl, 1000);
  window.addEventListener("storage", renderCurl);
})();
