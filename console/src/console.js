// The console page: noVNC's RFB client on the websocket the proxy bridges to the guest's VNC server.
// Like noVNC's own vnc_lite.html, it reads `path` from its query (the access URL puts `?token=...`
// there) and connects to the origin it was served from; the token never leaves that origin.
import RFB from "./novnc/core/rfb.js";

const status = document.getElementById("status");
const cad = document.getElementById("cad");

function show(state, text) {
  status.dataset.state = state;
  status.textContent = text;
}

const path = new URLSearchParams(window.location.search).get("path") ?? "";
const scheme = window.location.protocol === "https:" ? "wss" : "ws";
const url = `${scheme}://${window.location.host}/websockify${path.startsWith("?") ? path : ""}`;

let desktop = "";
const rfb = new RFB(document.getElementById("screen"), url, { wsProtocols: ["binary"] });
rfb.scaleViewport = true;
rfb.addEventListener("connect", () => {
  show("connected", desktop ? `Connected: ${desktop}` : "Connected");
  cad.disabled = false;
});
rfb.addEventListener("disconnect", (event) => {
  // clean: the proxy closed with a close frame (a refusal, an idle or stopping proxy, the guest gone)
  const clean = event.detail.clean;
  document.body.dataset.clean = String(clean);
  show(clean ? "disconnected" : "failed", clean ? "Disconnected" : "Connection lost or refused");
  cad.disabled = true;
});
rfb.addEventListener("securityfailure", (event) => show("failed", `Security failure: ${event.detail.reason}`));
rfb.addEventListener("desktopname", (event) => {
  desktop = event.detail.name;
  if (status.dataset.state === "connected") show("connected", `Connected: ${desktop}`);
});
cad.addEventListener("click", () => rfb.sendCtrlAltDel());
window.rfb = rfb; // for debugging from the browser's console
