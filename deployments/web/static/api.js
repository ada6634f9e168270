// The v1 routes as the page calls them: JSON bodies, errors as ApiError with the server's
// {"error": {"type", "message", "request_id"}} (deployments/http.py).

const API = new URL("../../", import.meta.url); // this file is <root>/demo/static/api.js

export class ApiError extends Error {
  constructor(status, type, message, requestId) {
    super(message);
    this.status = status;
    this.type = type;
    this.requestId = requestId;
  }
}

export async function api(path, body, key = "") {
  const headers = { Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (key) headers.Authorization = `Bearer ${key}`;
  let res;
  try {
    res = await fetch(new URL(path, API), {
      method: body === undefined ? "GET" : "POST", headers,
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (err) {
    throw new ApiError(0, "network_error", `the server did not answer (${err.message})`);
  }
  const text = await res.text();
  let data = null;
  try { data = JSON.parse(text); } catch { /* not JSON: reported below */ }
  if (!res.ok) {
    const e = data && data.error;
    throw new ApiError(res.status, e ? e.type : "http_error",
                       e ? e.message : (text.slice(0, 300) || res.statusText), e && e.request_id);
  }
  return data;
}

export function blobToBase64(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result.slice(reader.result.indexOf(",") + 1));
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}
