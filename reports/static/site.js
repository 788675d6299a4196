// dcnbench report: draws each figure when it scrolls into view, sorts tables on a header click.
"use strict";

function drawChart(div) {
  if (div.dataset.rendered) return;
  div.dataset.rendered = "pending";
  const figure = JSON.parse(document.getElementById(div.dataset.figure).textContent);
  div.innerHTML = "";
  Plotly.newPlot(div, figure.data, figure.layout, {responsive: true, displaylogo: false})
    .then(() => { div.dataset.rendered = "done"; });
}

// Tests and printing want every figure at once.
window.dcnRenderAll = function () {
  document.querySelectorAll(".chart").forEach(drawChart);
};

function sortTable(table, column, ascending) {
  const body = table.tBodies[0];
  const key = (row) => {
    const cell = row.cells[column];
    const text = cell.dataset.sort !== undefined ? cell.dataset.sort : cell.textContent.trim();
    const number = parseFloat(text.replace(/[×%±]/g, ""));
    return isNaN(number) ? text : number;
  };
  const rows = Array.from(body.rows);
  rows.sort((a, b) => {
    const x = key(a), y = key(b);
    const order = typeof x === typeof y ? (x < y ? -1 : x > y ? 1 : 0)
                                         : (typeof x === "number" ? -1 : 1);
    return ascending ? order : -order;
  });
  rows.forEach((row) => body.appendChild(row));
}

document.addEventListener("DOMContentLoaded", () => {
  const charts = document.querySelectorAll(".chart");
  if ("IntersectionObserver" in window) {
    const observer = new IntersectionObserver((entries) => {
      entries.forEach((entry) => {
        if (entry.isIntersecting) { observer.unobserve(entry.target); drawChart(entry.target); }
      });
    }, {rootMargin: "400px"});
    charts.forEach((div) => observer.observe(div));
  } else {
    charts.forEach(drawChart);
  }
  document.querySelectorAll("table.sortable th").forEach((th) => {
    th.title = "click to sort";
    th.addEventListener("click", () => {
      const ascending = th.dataset.order !== "asc";
      th.closest("tr").querySelectorAll("th").forEach((h) => delete h.dataset.order);
      th.dataset.order = ascending ? "asc" : "desc";
      sortTable(th.closest("table"), th.cellIndex, ascending);
    });
  });
});
