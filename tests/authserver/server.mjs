// A real OAuth 2.0 authorization server for tokengate's end-to-end tests: panva's
// oidc-provider (the version pinned in package.json) with the client credentials grant
// (RFC 6749 §4.4) enabled, listening on loopback. This file only configures it and adds
// one thing of ours: it records every request to the token endpoint (client, how the
// client authenticated, scope, resource, outcome; never a secret or a token) and serves
// that record at GET /__tokengate/calls, so tests can count the calls tokengate makes.
//
//   node server.mjs --port P --clients FILE [--resource URI]... [--ttl SECONDS]
//
//   --port P         listen on 127.0.0.1:P; the issuer is http://127.0.0.1:P
//                    (or $AUTHSERVER_PORT)
//   --clients FILE   JSON array of client metadata (client_id, client_secret,
//                    token_endpoint_auth_method, grant_types, scope, redirect_uris,
//                    response_types) (or $AUTHSERVER_CLIENTS)
//   --resource URI   a resource server (RFC 8707 `resource`) that issues JWT access
//                    tokens; the scopes a client may get for it are its own `scope`
//   --ttl SECONDS    access token lifetime, so responses carry `expires_in` (3600)
//
// Prints `authserver listening on 127.0.0.1:P` once it accepts connections.

import { generateKeyPairSync, randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { parseArgs } from 'node:util';

import Provider, { errors } from 'oidc-provider';

/** Where the record of token requests is served. */
const CALLS_PATH = '/__tokengate/calls';

/** At most this many stored artifacts (opaque tokens) are kept in memory. */
const STORE_LIMIT = 100_000;

const { values: options } = parseArgs({
  options: {
    port: { type: 'string', default: process.env.AUTHSERVER_PORT },
    clients: { type: 'string', default: process.env.AUTHSERVER_CLIENTS },
    resource: { type: 'string', multiple: true, default: [] },
    ttl: { type: 'string', default: '3600' },
  },
});

const port = Number(options.port);
const ttl = Number(options.ttl);
if (!Number.isInteger(port) || port <= 0 || !options.clients || !(ttl > 0)) {
  console.error('usage: node server.mjs --port P --clients FILE [--resource URI]... [--ttl SECONDS]');
  process.exit(2);
}

const clients = JSON.parse(readFileSync(options.clients, 'utf8'));
const resources = new Set(options.resource);
const clientScopes = clients.flatMap((client) => (client.scope ?? '').split(' ')).filter(Boolean);

/**
 * oidc-provider's storage interface, in memory. Given explicitly (rather than the
 * built-in development adapter) so that the provider prints no development warning.
 */
function memoryAdapter() {
  const store = new Map();
  const now = () => Math.floor(Date.now() / 1000);
  return class MemoryAdapter {
    constructor(model) {
      this.model = model;
    }

    key(id) {
      return `${this.model}:${id}`;
    }

    async upsert(id, payload, expiresIn) {
      if (store.size >= STORE_LIMIT) store.delete(store.keys().next().value);
      store.set(this.key(id), { payload, expiresAt: expiresIn ? now() + expiresIn : Infinity });
    }

    async find(id) {
      const entry = store.get(this.key(id));
      if (!entry) return undefined;
      if (entry.expiresAt <= now()) {
        store.delete(this.key(id));
        return undefined;
      }
      return entry.payload;
    }

    async findByUid() {
      return undefined;
    }

    async findByUserCode() {
      return undefined;
    }

    async consume(id) {
      const entry = store.get(this.key(id));
      if (entry) entry.payload.consumed = now();
    }

    async destroy(id) {
      store.delete(this.key(id));
    }

    async revokeByGrantId(grantId) {
      for (const [key, entry] of store) {
        if (entry.payload.grantId === grantId) store.delete(key);
      }
    }
  };
}

/**
 * A fresh signing key for this run (JWT access tokens, the JWKS endpoint): P-256,
 * generated in a millisecond where an RSA key takes hundreds.
 */
function signingKeys() {
  const { privateKey } = generateKeyPairSync('ec', { namedCurve: 'P-256' });
  return { keys: [{ ...privateKey.export({ format: 'jwk' }), kid: 'authserver', alg: 'ES256', use: 'sig' }] };
}

const issuer = `http://127.0.0.1:${port}`;
const provider = new Provider(issuer, {
  clients,
  adapter: memoryAdapter(),
  jwks: signingKeys(),
  cookies: { keys: [randomBytes(32).toString('base64url')] },
  // The only key is P-256: without this every client is refused as invalid_client_metadata.
  clientDefaults: { id_token_signed_response_alg: 'ES256' },
  scopes: [...new Set(clientScopes)],
  ttl: { ClientCredentials: ttl, AccessToken: ttl },
  features: {
    clientCredentials: { enabled: true },
    devInteractions: { enabled: false },
    resourceIndicators: {
      enabled: true,
      defaultResource: (_ctx, _client, oneOf) => oneOf,
      useGrantedResource: () => false,
      getResourceServerInfo: (_ctx, resource, client) => {
        if (!resources.has(resource)) throw new errors.InvalidTarget();
        return {
          scope: client.scope ?? '',
          accessTokenTTL: ttl,
          accessTokenFormat: 'jwt',
          jwt: { sign: { alg: 'ES256' } },
        };
      },
    },
  },
});

/** Every token endpoint request so far, in arrival order. */
const tokenRequests = [];

/** How a request authenticated its client: header, body, both or neither. */
function authMethod(ctx, body) {
  const basic = /^basic /i.test(ctx.get('authorization'));
  const post = body.client_secret !== undefined;
  if (basic && post) return 'basic+post';
  if (basic) return 'basic';
  return post ? 'post' : 'none';
}

/** The client_id from the Basic header (RFC 6749 §2.3.1: form-encoded, then base64). */
function basicClientId(ctx) {
  const match = /^basic (.+)$/i.exec(ctx.get('authorization'));
  if (!match) return undefined;
  const decoded = Buffer.from(match[1], 'base64').toString('utf8');
  const colon = decoded.indexOf(':');
  if (colon < 0) return undefined;
  try {
    return decodeURIComponent(decoded.slice(0, colon).replace(/\+/g, '%20'));
  } catch {
    return undefined;
  }
}

/** A form value as a list (absent: empty; repeated: every value). */
function values(value) {
  if (value === undefined) return [];
  return Array.isArray(value) ? value : [value];
}

provider.use(async (ctx, next) => {
  if (ctx.method === 'GET' && ctx.path === CALLS_PATH) {
    const byClient = {};
    for (const { client_id: id, outcome } of tokenRequests) {
      const key = id ?? '';
      byClient[key] ??= {};
      byClient[key][outcome] = (byClient[key][outcome] ?? 0) + 1;
    }
    ctx.body = { token_requests: tokenRequests, count: tokenRequests.length, by_client: byClient };
    return;
  }
  await next();
  if (ctx.method !== 'POST' || ctx.oidc?.route !== 'token') return;
  // Read after oidc-provider has parsed the form, so the body is left to it.
  const body = ctx.oidc.body ?? {};
  const error = ctx.status === 200 ? undefined : ctx.body?.error;
  const seen = {
    client_id: ctx.oidc.client?.clientId ?? basicClientId(ctx) ?? body.client_id,
    auth: authMethod(ctx, body),
    grant_type: body.grant_type,
    scope: body.scope,
    resource: values(body.resource),
    audience: values(body.audience),
    status: ctx.status,
    error,
    outcome: error ?? 'ok',
  };
  tokenRequests.push(seen);
  console.log(`token request client_id=${seen.client_id} auth=${seen.auth} scope=${seen.scope ?? ''} status=${seen.status}${error ? ` error=${error}` : ''}`);
});

const server = provider.listen(port, '127.0.0.1', () => {
  console.log(`authserver listening on 127.0.0.1:${port}`);
});
// EADDRINUSE when another process took the port first: the harness starts it on another.
server.on('error', (error) => {
  console.error(`authserver cannot listen on 127.0.0.1:${port}: ${error.code ?? error.message}`);
  process.exit(1);
});
