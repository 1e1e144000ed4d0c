// Starts Swagger UI on the docs page (service/docs.py). A file rather than an inline script, so
// the page's Content-Security-Policy can refuse every inline script.
"use strict";

const container = document.getElementById("swagger-ui");
window.ui = SwaggerUIBundle({
  url: container.dataset.openapiUrl,
  dom_id: "#swagger-ui",
  deepLinking: true,
  // Swagger UI's default sends the document to validator.swagger.io for a badge.
  validatorUrl: null,
  presets: [SwaggerUIBundle.presets.apis],
});
