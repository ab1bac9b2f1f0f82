// The status page's behaviour: live updates from /events (server-sent
// events, pushed by the agent), the buttons (POST with the page's CSRF
// token), and the ticking elapsed time of running builds.
(() => {
  "use strict";
  const csrf = document.querySelector('meta[name="nightshift-csrf"]').content;
  const hero = document.getElementById("live-hero");
  const details = document.getElementById("live-details");
  const feed = document.getElementById("feed");
  const message = document.getElementById("message");
  const reason = document.getElementById("reason");

  function words(seconds) {
    const s = Math.max(0, Math.floor(seconds));
    if (s < 60) return s + " s";
    if (s < 3600) return Math.floor(s / 60) + " min";
    const d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600), m = Math.floor((s % 3600) / 60);
    if (d === 0) return m === 0 ? h + " h" : h + " h " + m + " min";
    return d + (d === 1 ? " day" : " days") + (h === 0 ? "" : " " + h + " h");
  }

  function tick() {
    for (const el of document.querySelectorAll("[data-started]")) {
      const started = Date.parse(el.dataset.started);
      if (!Number.isNaN(started)) el.textContent = words((Date.now() - started) / 1000);
    }
  }

  function applyState() {
    const section = document.getElementById("hero");
    if (section) {
      document.body.dataset.state = section.dataset.state;
      document.title = section.dataset.title;
      // Show which choice is in force: a manual state, or automatic.
      const manual = section.dataset.manual;
      for (const button of document.querySelectorAll("button[data-action='set']")) {
        const timed = Boolean(button.dataset.for || button.dataset.until);
        const current = button.dataset.state === manual && !timed &&
          (manual !== "away" || section.dataset.manualEnds === "false");
        button.classList.toggle("current", current);
        button.setAttribute("aria-pressed", String(current));
      }
      document.querySelector(".away-row").classList.toggle("current", manual === "away");
    }
    tick();
  }

  function say(text, isError) {
    message.textContent = text;
    message.classList.toggle("error", Boolean(isError));
  }

  const events = new EventSource("/events");
  events.addEventListener("status", (event) => {
    const parts = JSON.parse(event.data);
    hero.innerHTML = parts.hero;
    details.innerHTML = parts.details;
    applyState();
  });
  events.addEventListener("open", () => {
    feed.textContent = "● live";
    feed.classList.remove("lost");
  });
  events.addEventListener("error", () => {
    feed.textContent = "○ reconnecting…";
    feed.classList.add("lost");
  });
  setInterval(tick, 1000);

  async function post(path, body) {
    const response = await fetch(path, {
      method: "POST",
      headers: { "Content-Type": "application/json", "X-Nightshift-CSRF": csrf },
      body: JSON.stringify(body),
    });
    let answer = {};
    try { answer = await response.json(); } catch (_) { /* not JSON */ }
    if (!response.ok) throw new Error(answer.error || response.status + " " + response.statusText);
    return answer;
  }

  document.addEventListener("click", async (event) => {
    const button = event.target.closest("button[data-action]");
    if (!button) return;
    const buttons = document.querySelectorAll("button[data-action]");
    try {
      if (button.dataset.action === "set") {
        const body = { state: button.dataset.state };
        if (button.dataset.for) body.for = button.dataset.for;
        if (button.dataset.until) body.until = button.dataset.until;
        const why = reason.value.trim();
        if (why && body.state !== "auto") body.reason = why;
        buttons.forEach((b) => { b.disabled = true; });
        say("Telling the agent…");
        await post("/api/v1/set-availability", body);
        const label = button.textContent.trim().toLowerCase();
        say(body.state === "auto" ? "Back to automatic." : "Done: " + (body.state === "away" ? "away " + label : label) + ".");
      } else if (button.dataset.action === "stop") {
        if (!window.confirm("Stop the agent? It finishes the build it is running, then exits.")) return;
        buttons.forEach((b) => { b.disabled = true; });
        await post("/api/v1/stop", { graceful: true });
        say("The agent is stopping. It exits when its current build is done.");
      }
    } catch (error) {
      say("That did not work: " + error.message, true);
    } finally {
      buttons.forEach((b) => { b.disabled = false; });
    }
  });

  applyState();
})();
