"use strict";
document.getElementById("login").addEventListener("submit", async (event) => {
  event.preventDefault();
  const value = document.getElementById("token").value.trim();
  const error = document.getElementById("error");
  error.textContent = "";
  try {
    const me = await Feedback.api("GET", "/api/me", undefined, value);
    Feedback.setToken(value);
    location.href = "/annotate";
  } catch (e) {
    error.textContent = e.status === 401 ? "This token is not valid." : e.message;
  }
});
