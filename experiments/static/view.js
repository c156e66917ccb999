// attnlab's interactive views: the token view of an induction head and the heatmap glue (plotly.js).
// Shipped as package data and inlined once per page; every string it shows arrives as data (script_json) and is
// put into the page as text (textContent), never as markup.
function attnlabHalf(u) {
  const s = (u & 0x8000) ? -1 : 1, e = (u >> 10) & 0x1f, f = u & 0x3ff;
  if (e === 0) return s * Math.pow(2, -14) * (f / 1024);
  if (e === 31) return f ? NaN : s * Infinity;
  return s * Math.pow(2, e - 15) * (1 + f / 1024);
}
function attnlabHalves(b64) {
  const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
  return new Uint16Array(bytes.buffer);
}
function attnlabRow(run, trial, layer, head, target) {
  // the query's attention row of one head in one trial: a kept trial's, else the row stored for the trial that
  // contributes most to this head's mean on `target`
  const [n, L, H, S] = run.shape, row = new Float64Array(S);
  if (trial < n) {
    run._rows = run._rows || attnlabHalves(run.rows);
    const base = ((trial * L + layer) * H + head) * S;
    for (let s = 0; s < S; s++) row[s] = attnlabHalf(run._rows[base + s]);
    return row;
  }
  const top = run.top[target];
  top._rows = top._rows || attnlabHalves(top.rows);
  const base = (layer * H + head) * S;
  for (let s = 0; s < S; s++) row[s] = attnlabHalf(top._rows[base + s]);
  return row;
}
function attnlabShade(v, max, log) {
  if (!(v > 0)) return 0;
  if (log) return Math.max(0, Math.min(1, (Math.log10(v) + 4) / 4));
  return max > 0 ? Math.min(1, v / max) : 0;
}
function attnlabTokenView(detailId, run, layer, head, target, title) {
  const box = document.getElementById(detailId), [n, L, H, S] = run.shape;
  const top = run.top && run.top[target], query = run.query || '[MASK]';
  box.innerHTML = '';
  const head_ = document.createElement('p');
  head_.className = 'tv-title';
  head_.textContent = title + ' - L' + layer + 'H' + head + ': attention from ' + query + ' to every token of one trial';
  box.appendChild(head_);
  const ui = document.createElement('div');
  ui.className = 'tv-controls';
  const pick = document.createElement('select');
  pick.setAttribute('aria-label', 'trial');
  for (let t = 0; t < n; t++) pick.add(new Option('trial ' + (t + 1) + ' of ' + run.n_trials, String(t)));
  let best = null;
  if (top) {
    best = top.trial[layer][head];
    const share = top.share[layer][head];
    const label = 'trial ' + (best + 1) + ': contributes most (' +
                  (share === null ? 'n/a' : (100 * share).toFixed(1) + '% of the sum') + ')';
    pick.add(new Option(label, 'top'));
  }
  const scale = document.createElement('select');
  scale.setAttribute('aria-label', 'scale');
  scale.add(new Option('linear scale (0 .. row max)', 'linear'));
  scale.add(new Option('log scale (1e-4 .. 1)', 'log'));
  ui.appendChild(pick); ui.appendChild(document.createTextNode(' ')); ui.appendChild(scale);
  if (top) {
    const jump = document.createElement('button');
    jump.type = 'button'; jump.className = 'tv-top';
    jump.textContent = 'the trial that contributes most';
    jump.onclick = () => { pick.value = 'top'; draw(); };
    ui.appendChild(document.createTextNode(' ')); ui.appendChild(jump);
  }
  box.appendChild(ui);
  const info = document.createElement('p');
  info.className = 'tv-info';
  box.appendChild(info);
  const legend = document.createElement('p');
  legend.className = 'hint';
  legend.textContent = 'Darker blue: more attention. Orange frame: the query (' + query + '); green frame: the ' +
    'target "' + target + '"; dotted: the other targets. Hover a token for its value.';
  const tokens = document.createElement('div');
  tokens.className = 'tv-tokens';
  box.appendChild(tokens);
  box.appendChild(legend);
  function draw() {
    const trial = pick.value === 'top' ? best : Number(pick.value);
    const info_ = run.trials[String(trial)];
    if (typeof info_.ids === 'string') {  // little-endian token ids, decoded once
      const bytes = Uint8Array.from(atob(info_.ids), c => c.charCodeAt(0));
      info_.ids = Array.from(run.ids_type === 'i32' ? new Int32Array(bytes.buffer) : new Uint16Array(bytes.buffer));
    }
    const row = attnlabRow(run, pick.value === 'top' ? n : trial, layer, head, target);
    let max = 0;
    for (let s = 0; s < S; s++) if (row[s] > max) max = row[s];
    const marks = {};
    for (const k of Object.keys(info_.targets)) marks[info_.targets[k]] = k;
    tokens.innerHTML = '';
    for (let s = 0; s < S; s++) {
      const span = document.createElement('span'), v = row[s];
      const a = attnlabShade(v, max, scale.value === 'log');
      span.className = 'tv-tok';
      let text = run.vocab[String(info_.ids[s])];
      if (text === undefined) text = String(info_.ids[s]);
      if (s === info_.mask && info_.masked !== undefined) text = text + ' (' + info_.masked + ')';
      span.textContent = text;
      span.style.background = 'rgba(8, 81, 156, ' + (0.9 * a).toFixed(3) + ')';
      span.style.color = a > 0.55 ? '#fff' : '#000';
      let what = '';
      if (s === info_.mask) { span.classList.add('tv-query'); what = ' - the query'; }
      if (marks[s] !== undefined) {
        span.classList.add(marks[s] === target ? 'tv-target' : 'tv-other');
        what += ' - target "' + marks[s] + '"';
      }
      span.title = 'position ' + s + ': ' + text + what + '\nattention ' + v.toPrecision(3);
      tokens.appendChild(span);
      tokens.appendChild(document.createTextNode(' '));
    }
    const at = info_.targets[target];
    info.textContent = 'trial ' + (trial + 1) + ' of ' + run.n_trials + ': attention on the target "' + target +
      '" ' + (at === undefined ? 'n/a' : row[at].toPrecision(3)) + '; largest in this row ' + max.toPrecision(3) +
      ' (position ' + row.indexOf(max) + ')';
  }
  pick.onchange = draw; scale.onchange = draw;
  draw();
}
function attnlabHeatmap(divId, detailId, spec, run, target, title) {
  const gd = document.getElementById(divId);
  Plotly.newPlot(gd, spec.data, spec.layout, {displayModeBar: false, responsive: true}).then(() => {
    gd.on('plotly_click', ev => {
      const p = ev.points[0];
      attnlabTokenView(detailId, run, p.y, p.x, target, title);
    });
  });
}
