// A real OpenID Provider (the `oidc-provider` package) on loopback, for the Portcullis tests.
//
// Usage: node provider.mjs CONFIG.json
// Prints `READY <issuer>` on stdout once it accepts connections; SIGTERM stops it.
// README.md beside this file describes the config file and what the provider offers.

import { createPrivateKey } from 'node:crypto';
import { readFileSync, renameSync, writeFileSync } from 'node:fs';

import Provider from 'oidc-provider';

const LOOPBACK = '127.0.0.1';

function fail(message) {
  process.stderr.write(`provider.mjs: ${message}\n`);
  process.exit(2);
}

const configPath = process.argv[2];
if (!configPath) {
  fail('usage: node provider.mjs CONFIG.json');
}

let config;
try {
  config = JSON.parse(readFileSync(configPath, 'utf8'));
} catch (err) {
  fail(`cannot read ${configPath}: ${err.message}`);
}

for (const key of ['port', 'keys', 'ttl', 'users', 'clients', 'cookie_keys']) {
  if (config[key] === undefined) {
    fail(`${configPath}: missing key \`${key}\``);
  }
}
if (!Array.isArray(config.keys) || config.keys.length === 0) {
  fail(`${configPath}: \`keys\` must list at least one signing key`);
}

const issuer = `http://${LOOPBACK}:${config.port}`;

// oidc-provider signs with the first key of the algorithm it needs, so the order of
// `keys` decides which kid new tokens carry; every listed key is published in the JWKS.
const jwks = {
  keys: config.keys.map(({ kid, pem }) => ({
    ...createPrivateKey(pem).export({ format: 'jwk' }),
    kid,
    alg: 'RS256',
    use: 'sig',
  })),
};

const users = new Map(config.users.map((user) => [user.id, user]));

// A file-backed store so that a restart (same state file) keeps sessions, grants and
// refresh tokens, as a real provider with a database does; without `state_file` it
// lives in memory only. The data set is a handful of records, so scans are fine.
class StateStore {
  constructor(path) {
    this.path = path;
    this.records = {};
    if (path) {
      try {
        this.records = JSON.parse(readFileSync(path, 'utf8'));
      } catch (err) {
        if (err.code !== 'ENOENT') {
          fail(`cannot read state file ${path}: ${err.message}`);
        }
      }
    }
  }

  save() {
    if (!this.path) {
      return;
    }
    const tmp = `${this.path}.tmp`;
    writeFileSync(tmp, JSON.stringify(this.records));
    renameSync(tmp, this.path);
  }

  live(key) {
    const record = this.records[key];
    if (!record) {
      return undefined;
    }
    if (record.expiresAt !== null && record.expiresAt <= Date.now()) {
      delete this.records[key];
      return undefined;
    }
    return record;
  }

  findWhere(model, predicate) {
    for (const key of Object.keys(this.records)) {
      if (key.startsWith(`${model}:`)) {
        const record = this.live(key);
        if (record && predicate(record.payload)) {
          return record.payload;
        }
      }
    }
    return undefined;
  }
}

const store = new StateStore(config.state_file);

class FileAdapter {
  constructor(model) {
    this.model = model;
  }

  key(id) {
    return `${this.model}:${id}`;
  }

  async upsert(id, payload, expiresIn) {
    const expiresAt = typeof expiresIn === 'number' ? Date.now() + expiresIn * 1000 : null;
    store.records[this.key(id)] = { payload, expiresAt };
    store.save();
  }

  async find(id) {
    return store.live(this.key(id))?.payload;
  }

  async findByUid(uid) {
    return store.findWhere(this.model, (payload) => payload.uid === uid);
  }

  async findByUserCode(userCode) {
    return store.findWhere(this.model, (payload) => payload.userCode === userCode);
  }

  async consume(id) {
    const record = store.live(this.key(id));
    if (record) {
      record.payload.consumed = Math.floor(Date.now() / 1000);
      store.save();
    }
  }

  async destroy(id) {
    delete store.records[this.key(id)];
    store.save();
  }

  async revokeByGrantId(grantId) {
    for (const key of Object.keys(store.records)) {
      if (key.startsWith(`${this.model}:`) && store.records[key].payload.grantId === grantId) {
        delete store.records[key];
      }
    }
    store.save();
  }
}

const ttlOr = (name, fallback) => {
  const value = config.ttl[name];
  return typeof value === 'number' ? value : fallback;
};

const rotateRefreshToken = typeof config.rotate_refresh_tokens === 'boolean'
  ? () => config.rotate_refresh_tokens
  : undefined;

const provider = new Provider(issuer, {
  adapter: FileAdapter,
  clients: config.clients,
  jwks,
  cookies: { keys: config.cookie_keys },
  scopes: ['openid', 'offline_access', 'email', 'profile', 'groups'],
  claims: {
    openid: ['sub'],
    email: ['email', 'email_verified'],
    profile: ['name', 'preferred_username'],
    groups: ['groups'],
  },
  // The agent reads identity from the ID token; by default oidc-provider would keep
  // scope-derived claims for the userinfo endpoint whenever an access token is issued.
  conformIdTokenClaims: false,
  features: {
    devInteractions: { enabled: true },
    deviceFlow: { enabled: true },
    clientCredentials: { enabled: true },
    revocation: { enabled: true },
    introspection: { enabled: true },
    userinfo: { enabled: true },
  },
  ...(rotateRefreshToken ? { rotateRefreshToken } : {}),
  ttl: {
    AccessToken: ttlOr('AccessToken', 3600),
    IdToken: ttlOr('IdToken', 3600),
    RefreshToken: ttlOr('RefreshToken', 14 * 24 * 3600),
    DeviceCode: ttlOr('DeviceCode', 600),
    ClientCredentials: ttlOr('ClientCredentials', 600),
    Interaction: ttlOr('Interaction', 3600),
    Session: ttlOr('Session', 14 * 24 * 3600),
    Grant: ttlOr('Grant', 14 * 24 * 3600),
  },
  async findAccount(_ctx, sub) {
    const user = users.get(sub);
    if (!user) {
      return undefined;
    }
    return {
      accountId: sub,
      async claims() {
        return {
          sub,
          email: user.email,
          email_verified: true,
          name: user.name,
          preferred_username: sub,
          groups: user.groups,
        };
      },
    };
  },
});

// Failures inside the provider otherwise only show as a generic error page; the test
// harness keeps stderr so a failing test can show why.
for (const event of ['server_error', 'grant.error', 'introspection.error', 'revocation.error',
  'device_authorization.error', 'interaction.error', 'authorization.error',
  'backchannel.error', 'jwks.error']) {
  provider.on(event, (_ctx, err) => {
    process.stderr.write(`${event}: ${err?.name ?? ''} ${err?.message ?? err} ${err?.error_description ?? ''}\n`);
  });
}

// The dev login form signs in whatever name is typed, and an account that findAccount
// does not know then crashes the flow with a 500. A real provider refuses the login
// instead: this ends the interaction with access_denied, which the polling device sees.
provider.use(async (ctx, next) => {
  if (ctx.method !== 'POST' || !/^\/interaction\/[^/]+$/.test(ctx.path)) {
    return next();
  }
  const chunks = [];
  for await (const chunk of ctx.req) {
    chunks.push(chunk);
  }
  const raw = Buffer.concat(chunks);
  // oidc-provider's own body parser takes an already read body from here.
  ctx.req.body = raw;
  const form = new URLSearchParams(raw.toString('utf8'));
  if (form.get('prompt') === 'login' && !users.has(form.get('login'))) {
    await provider.interactionFinished(ctx.req, ctx.res, {
      error: 'access_denied',
      error_description: 'unknown user',
    }, { mergeWithLastSubmission: false });
    return undefined;
  }
  return next();
});

const server = provider.listen(config.port, LOOPBACK, () => {
  process.stdout.write(`READY ${issuer}\n`);
});
server.on('error', (err) => fail(`cannot listen on ${LOOPBACK}:${config.port}: ${err.message}`));

process.on('SIGTERM', () => {
  server.close();
  server.closeAllConnections?.();
  process.exit(0);
});
