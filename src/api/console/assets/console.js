// keygate console: the copy button on the one-time token page. Nothing else
// runs in the browser; every page works without it.
document.addEventListener("DOMContentLoaded", () => {
  for (const button of document.querySelectorAll("[data-copy]")) {
    button.addEventListener("click", async () => {
      const field = document.getElementById(button.dataset.copy);
      field.select();
      try {
        await navigator.clipboard.writeText(field.value);
        button.textContent = "Copied";
      } catch (_) {
        document.execCommand("copy");
        button.textContent = "Copied";
      }
    });
  }
});
