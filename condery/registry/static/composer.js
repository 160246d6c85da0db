// The name composer, live: asks the server to compose (the grammar lives there only),
// then shows the lines to copy and the solved packages. Builds DOM nodes with
// textContent only: nothing typed or solved is ever parsed as HTML.
"use strict";
(function () {
  const specs = document.getElementById("specs");
  const composed = document.getElementById("composed");
  const solved = document.getElementById("solved");
  if (!specs || !composed || !solved) return;
  const host = composed.dataset.host;
  let timer = null;
  let generation = 0;

  function el(tag, text, cls) {
    const node = document.createElement(tag);
    if (text !== undefined) node.textContent = text;
    if (cls) node.className = cls;
    return node;
  }

  function lines(name) {
    const image = host + "/" + name + ":latest";
    const dl = el("dl", undefined, "lines");
    for (const [where, kind, line] of [
      ["docker", "docker", "docker pull " + image],
      ["podman", "podman", "podman run --rm -it " + image],
      ["JupyterHub (KubeSpawner profile)", "jupyterhub", "image: " + image],
      ["GitHub Actions job", "github", "container: " + image],
    ]) {
      dl.appendChild(el("dt", where));
      const dd = el("dd");
      const code = el("code", line, "copy");
      code.dataset.kind = kind;
      dd.appendChild(code);
      dl.appendChild(dd);
    }
    return dl;
  }

  function size(n) {
    const units = ["B", "KiB", "MiB", "GiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i === 0 ? n.toFixed(0) : n.toFixed(1)) + " " + units[i];
  }

  async function showSolved(name, mine) {
    solved.replaceChildren(el("p", "Solving " + name + " ...", "pending"));
    let body;
    try {
      const answer = await fetch("/api/v1/images/" + name + "/latest");
      body = await answer.json();
    } catch (error) {
      body = {errors: [{message: String(error)}]};
    }
    if (mine !== generation) return;  // the specs changed meanwhile
    if (body.errors) {
      solved.replaceChildren(el("p", body.errors[0].message, "error"));
      return;
    }
    const parts = [];
    for (const [subdir, platform] of Object.entries(body.platforms)) {
      parts.push(el("h3", subdir + ": " + platform.packages.length + " packages, " + size(platform.size) + " to download"));
      const table = el("table", undefined, "packages");
      const head = el("tr");
      for (const h of ["package", "version", "build", "channel", "size"]) head.appendChild(el("th", h));
      table.appendChild(head);
      for (const p of platform.packages) {
        const row = el("tr");
        for (const cell of [p.name, p.version, p.build, p.channel, size(p.size)]) row.appendChild(el("td", cell));
        table.appendChild(row);
      }
      parts.push(table);
    }
    parts.push(el("p", body.digest ? "Built: " + body.digest : "Not built yet: the first pull builds it."));
    solved.replaceChildren(...parts);
  }

  async function update() {
    const mine = ++generation;
    const text = specs.value;
    if (!text.trim()) {
      composed.replaceChildren(el("ul", undefined, "problems"));
      solved.replaceChildren();
      return;
    }
    const answer = await fetch("/api/v1/compose?specs=" + encodeURIComponent(text));
    const body = await answer.json();
    if (mine !== generation) return;
    const problems = el("ul", undefined, "problems");
    problems.id = "problems";
    for (const p of body.problems) {
      const li = el("li");
      li.appendChild(el("code", p.spec));
      li.appendChild(document.createTextNode(": " + p.reason));
      problems.appendChild(li);
    }
    specs.classList.toggle("invalid", body.problems.length > 0);
    const parts = [problems];
    if (body.name) {
      const p = el("p", "Image name: ");
      const a = el("a");
      a.id = "image-name";
      a.href = "/images/" + body.name + "/latest";
      a.appendChild(el("code", body.name));
      p.appendChild(a);
      parts.push(p, lines(body.name));
    }
    composed.replaceChildren(...parts);
    if (body.name) showSolved(body.name, mine); else solved.replaceChildren();
  }

  specs.addEventListener("input", function () {
    clearTimeout(timer);
    timer = setTimeout(update, 250);
  });
  document.getElementById("compose-form").addEventListener("submit", function (event) {
    event.preventDefault();
    update();
  });
})();
