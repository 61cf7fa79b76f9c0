// mesh-serve playground: streams /v1/completions or /v1/chat/completions and shows what depth does.
// Model output is always shown with textContent (never as HTML). The API key lives in the page only.
"use strict";

const $ = (id) => document.getElementById(id);
let controller = null; // aborts the request in flight (Stop)

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function setStatus(text) {
  $("status").textContent = text;
}

async function loadModel() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    if (r.status === 401) {
      setStatus("This server needs an API key (missing or wrong): type it in the key field.");
      return;
    }
    const card = (await r.json()).data[0];
    $("model-info").textContent =
      `${card.id} · layout ${card.layout} · scheme ${card.scheme} · loops 1..${card.max_loops} (default ${card.default_loops})`;
    const slider = $("loops");
    slider.max = String(card.max_loops);
    slider.value = String(card.default_loops);
    $("loops-value").textContent = slider.value;
    $("auto-wrap").hidden = !card.loops_auto; // adaptive depth, where the server has it
    setStatus("");
  } catch (e) {
    setStatus("Could not reach the server: " + e);
  }
}

function requestBody(loops, stream) {
  const body = {
    max_tokens: Number($("max-tokens").value),
    temperature: Number($("temperature").value),
    loops: loops,
    stream: stream,
    stream_options: { include_usage: true, continuous_usage_stats: true },
  };
  const prompt = $("prompt").value;
  if ($("mode").value === "chat") {
    return ["/v1/chat/completions", { ...body, messages: [{ role: "user", content: prompt }] }];
  }
  return ["/v1/completions", { ...body, prompt: prompt, echo: $("echo").checked }];
}

// One streamed request at `loops` (a depth or "auto"); view = {output, ttft, tps, tokens, depth}.
// Resolves when the stream ends.
async function run(loops, view, signal) {
  const [path, body] = requestBody(loops, true);
  const start = performance.now();
  let first = null, tokens = 0, steps = null;
  view.output.textContent = "";
  view.output.dataset.state = "running";
  const r = await fetch(path, { method: "POST", headers: headers(), body: JSON.stringify(body), signal });
  if (!r.ok) {
    const err = await r.json().catch(() => ({ error: { message: r.statusText } }));
    view.output.dataset.state = "error";
    throw new Error(`${r.status}: ${err.error.message}`);
  }
  const reader = r.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      if (!event.startsWith("data: ") || event === "data: [DONE]") continue;
      const chunk = JSON.parse(event.slice(6));
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) {
        tokens = chunk.usage.completion_tokens;
        steps = chunk.usage.loop_steps ?? null; // core iterations run: loop_steps / tokens is the mean depth
      }
      for (const choice of chunk.choices) {
        const text = choice.text ?? (choice.delta && choice.delta.content) ?? "";
        if (!text) continue;
        if (first === null) first = performance.now();
        view.output.textContent += text; // text, never HTML
      }
      if (view.loops) view.loops.textContent = String(chunk.loops);
    }
  }
  const seconds = (performance.now() - start) / 1000;
  view.ttft.textContent = first === null ? "–" : `${Math.round(first - start)} ms`;
  view.tps.textContent = (tokens / seconds).toFixed(1);
  view.tokens.textContent = String(tokens);
  view.depth.textContent = steps === null || !tokens ? "–" : (steps / tokens).toFixed(2);
  view.output.dataset.state = "done";
}

function busy(on) {
  $("generate").disabled = on;
  $("compare").disabled = on;
  $("stop").disabled = !on;
}

async function guarded(work) {
  controller = new AbortController();
  busy(true);
  setStatus("");
  try {
    await work(controller.signal);
  } catch (e) {
    setStatus(e.name === "AbortError" ? "Stopped." : String(e.message || e));
  } finally {
    busy(false);
    controller = null;
  }
}

function generate() {
  $("single").hidden = false;
  $("compare-view").hidden = true;
  const view = { output: $("output"), ttft: $("ttft"), tps: $("tps"), tokens: $("tokens"), loops: $("used-loops"),
                 depth: $("mean-loops") };
  const loops = $("loops-auto").checked ? "auto" : Number($("loops").value);
  return guarded((signal) => run(loops, view, signal));
}

function column(loops) {
  const col = document.createElement("div");
  col.className = "column";
  col.dataset.loops = String(loops);
  const title = document.createElement("h2");
  title.textContent = `loops = ${loops}`;
  const stats = document.createElement("div");
  stats.className = "stats";
  const view = { output: document.createElement("pre") };
  view.output.className = "column-output";
  for (const [name, label] of [["ttft", "first token"], ["tps", "tokens/s"], ["tokens", "tokens"], ["depth", "mean loops"]]) {
    const span = document.createElement("span");
    span.textContent = label + " ";
    view[name] = document.createElement("b");
    view[name].className = "column-" + name;
    view[name].textContent = "–";
    span.append(view[name]);
    stats.append(span);
  }
  col.append(title, stats, view.output);
  return [col, view];
}

// One prompt at every depth (and "auto" where the server has it), one after another, so each
// column's tokens/s is measured alone.
function compare() {
  const grid = $("compare-view");
  grid.replaceChildren();
  grid.hidden = false;
  $("single").hidden = true;
  const depths = Array.from({ length: Number($("loops").max) }, (_, i) => i + 1);
  if (!$("auto-wrap").hidden) depths.push("auto");
  const views = depths.map((k) => {
    const [col, view] = column(k);
    grid.append(col);
    return view;
  });
  return guarded(async (signal) => {
    for (let i = 0; i < depths.length; i++) await run(depths[i], views[i], signal);
  });
}

document.addEventListener("DOMContentLoaded", () => {
  $("loops").addEventListener("input", () => ($("loops-value").textContent = $("loops").value));
  $("loops-auto").addEventListener("change", () => ($("loops").disabled = $("loops-auto").checked));
  $("generate").addEventListener("click", generate);
  $("compare").addEventListener("click", compare);
  $("stop").addEventListener("click", () => controller && controller.abort());
  $("api-key").addEventListener("change", loadModel);
  $("mode").addEventListener("change", () => ($("echo").disabled = $("mode").value === "chat"));
  loadModel();
});
