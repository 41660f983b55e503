// The API docs page: Swagger UI over this server's own OpenAPI document.
window.addEventListener("load", () => {
  window.ui = SwaggerUIBundle({
    url: "/openapi.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    tryItOutEnabled: false,
    validatorUrl: null, // its badge would call validator.swagger.io: the page stays offline
  });
});
