// attnlab's interactive views: the token view of an induction head and the heatmap glue (plotly.js).
// Shipped as package data and inlined once per page; every string it shows arrives escaped (script_json).
function attnlabRows(run) {
  if (!run._rows) {
    const bytes = Uint8Array.from(atob(run.rows), c => c.charCodeAt(0));
    run._rows = bytes;
  }
  return run._rows;
}
function attnlabTokenView(detailId, run, layer, head, target, title) {
  const rows = attnlabRows(run), [n, L, H, S] = run.shape, traces = [], shapes = [], annotations = [];
  const height = 1 / n;
  for (let t = 0; t < n; t++) {
    const base = ((t * L + layer) * H + head) * S, y = [], text = [];
    for (let s = 0; s < S; s++) { y.push(rows[base + s] / 255); text.push(run.tokens[t][s]); }
    const axis = t === 0 ? '' : String(t + 1);
    traces.push({type: 'bar', x: [...Array(S).keys()], y: y, text: text, textposition: 'none',
                 hovertemplate: 'position %{x}: %{text}<br>attention %{y:.3f}<extra>trial ' + (t + 1) + '</extra>',
                 xaxis: 'x' + axis, yaxis: 'y' + axis, marker: {color: '#3182bd'}, showlegend: false});
    for (let s = 0; s < S; s++) {  // every instance of the masked token: where the copies put it
      if (run.masked && run.tokens[t][s] === run.masked[t]) {
        shapes.push({type: 'rect', xref: 'x' + axis, yref: 'y' + axis + ' domain', x0: s - 0.5, x1: s + 0.5, y0: 0, y1: 1,
                     fillcolor: '#fdd0a2', opacity: 0.6, line: {width: 0}, layer: 'below'});
      }
    }
    const marks = [[run.mask[t], (run.query || '[MASK]') + ' (query)', '#d95f02']].concat(
      Object.keys(run.targets).map(k => [run.targets[k][t], k, k === target ? '#1b9e77' : '#999999']));
    for (const [pos, name, color] of marks) {
      shapes.push({type: 'line', xref: 'x' + axis, yref: 'y' + axis + ' domain', x0: pos, x1: pos, y0: 0, y1: 1,
                   line: {color: color, width: name === target ? 2 : 1, dash: name === target ? 'solid' : 'dot'}});
      annotations.push({xref: 'x' + axis, yref: 'y' + axis + ' domain', x: pos, y: 1.02, text: name,
                        showarrow: false, font: {size: 9, color: color}, yanchor: 'bottom'});
    }
  }
  document.getElementById(detailId).innerHTML = '';
  const layout = {title: {text: title + ' - L' + layer + 'H' + head + ': attention from ' + (run.query || '[MASK]') +
                          ' over the tokens of ' + n + ' trials' +
                          (run.masked ? ' (shaded: the instances of the query token)' : ''), font: {size: 12}},
                  height: 170 * n + 60, margin: {l: 50, r: 10, t: 50, b: 30}, shapes: shapes, annotations: annotations,
                  grid: {rows: n, columns: 1, pattern: 'independent', ygap: 0.35}, bargap: 0};
  Plotly.newPlot(detailId, traces, layout, {displayModeBar: false, responsive: true});
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
