// CPU kernels of sampling, fastml::sampling_filter and fastml::sampling_sample (schemas in
// fastml/ops/sampling/schema.py; the kept set and the draw are defined in fastml/ops/sampling/reference.py).
//
// No sort. One task per row (at::parallel_for over rows), with thread-local scratch that only grows:
//  1. one pass: x = logits / temperature in the accumulation type, NaN / +inf / nothing-finite detection, the max,
//     the number of finite values and, with top-k, a 2048-bin histogram of the top 11 bits of each value's
//     order-preserving integer key (the float's bits, sign-folded, -0 taken as +0);
//  2. top-k: the bin holding the k-th largest key, then one pass that gathers the tokens of the bins at and above
//     it (fewer than k plus one bin), and a radix select (8-bit digits) on that short list for the exact k-th key;
//  3. top-p: on the candidates (what top-k left, or every finite token), the integer weights of reference.py and
//     a radix descent on the keys with per-digit counts and masses: at each level the lowest non-empty digit whose
//     mass above (an exact int64 sum, so no summation-order question) is still below top_p * Z, down to the exact
//     key of the boundary token;
//  4. the kept set is {finite x: key(x) >= max(k-th key, top-p key), x - max >= log(min_p)} plus keep_ids; the
//     filter writes it, the sampler runs a Gumbel-max race over it with the counter-based noise (float64), ties
//     to the lowest id, and sums exp(x - max) over it in float64 for the log-probability. Tokens whose value plus
//     a bound of their noise cannot beat the best score so far skip the logs; the race runs in fixed chunks of
//     the row (in parallel when there are fewer rows than threads), merged in order.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "common.h"

namespace {

constexpr double kLog2e = 1.4426950408889634;
constexpr int kWeightBits = 36;
constexpr int64_t kChunk = 512;

// EXP2_HI[a] = round(2^(a / 256) * 2^30), EXP2_LO[b] = round(2^(b / 65536) * 2^30) (reference.py, to 50 digits).
constexpr int64_t kExp2Hi[256] = {
    1073741824LL, 1076653033LL, 1079572136LL, 1082499153LL, 1085434106LL, 1088377016LL,
    1091327906LL, 1094286796LL, 1097253708LL, 1100228665LL, 1103211687LL, 1106202798LL,
    1109202018LL, 1112209370LL, 1115224875LL, 1118248556LL, 1121280436LL, 1124320536LL,
    1127368878LL, 1130425485LL, 1133490379LL, 1136563583LL, 1139645120LL, 1142735011LL,
    1145833280LL, 1148939949LL, 1152055042LL, 1155178580LL, 1158310587LL, 1161451085LL,
    1164600099LL, 1167757650LL, 1170923762LL, 1174098458LL, 1177281762LL, 1180473697LL,
    1183674286LL, 1186883552LL, 1190101520LL, 1193328213LL, 1196563654LL, 1199807867LL,
    1203060876LL, 1206322705LL, 1209593378LL, 1212872918LL, 1216161350LL, 1219458698LL,
    1222764986LL, 1226080238LL, 1229404479LL, 1232737732LL, 1236080024LL, 1239431376LL,
    1242791816LL, 1246161366LL, 1249540052LL, 1252927899LL, 1256324931LL, 1259731174LL,
    1263146652LL, 1266571390LL, 1270005413LL, 1273448747LL, 1276901417LL, 1280363448LL,
    1283834865LL, 1287315695LL, 1290805962LL, 1294305692LL, 1297814910LL, 1301333643LL,
    1304861917LL, 1308399756LL, 1311947188LL, 1315504238LL, 1319070932LL, 1322647296LL,
    1326233356LL, 1329829140LL, 1333434672LL, 1337049980LL, 1340675091LL, 1344310030LL,
    1347954824LL, 1351609500LL, 1355274085LL, 1358948606LL, 1362633090LL, 1366327563LL,
    1370032052LL, 1373746586LL, 1377471191LL, 1381205894LL, 1384950723LL, 1388705706LL,
    1392470869LL, 1396246240LL, 1400031848LL, 1403827719LL, 1407633882LL, 1411450365LL,
    1415277195LL, 1419114401LL, 1422962010LL, 1426820052LL, 1430688553LL, 1434567544LL,
    1438457051LL, 1442357104LL, 1446267730LL, 1450188960LL, 1454120821LL, 1458063343LL,
    1462016553LL, 1465980482LL, 1469955159LL, 1473940611LL, 1477936870LL, 1481943963LL,
    1485961921LL, 1489990772LL, 1494030547LL, 1498081275LL, 1502142985LL, 1506215708LL,
    1510299473LL, 1514394310LL, 1518500250LL, 1522617322LL, 1526745556LL, 1530884983LL,
    1535035634LL, 1539197537LL, 1543370725LL, 1547555228LL, 1551751076LL, 1555958300LL,
    1560176931LL, 1564406999LL, 1568648537LL, 1572901575LL, 1577166143LL, 1581442275LL,
    1585730000LL, 1590029350LL, 1594340357LL, 1598663052LL, 1602997467LL, 1607343634LL,
    1611701585LL, 1616071351LL, 1620452965LL, 1624846459LL, 1629251865LL, 1633669214LL,
    1638098541LL, 1642539877LL, 1646993254LL, 1651458706LL, 1655936265LL, 1660425963LL,
    1664927835LL, 1669441912LL, 1673968228LL, 1678506817LL, 1683057710LL, 1687620943LL,
    1692196547LL, 1696784557LL, 1701385007LL, 1705997930LL, 1710623359LL, 1715261330LL,
    1719911875LL, 1724575029LL, 1729250827LL, 1733939301LL, 1738640488LL, 1743354420LL,
    1748081133LL, 1752820662LL, 1757573041LL, 1762338305LL, 1767116489LL, 1771907628LL,
    1776711757LL, 1781528911LL, 1786359126LL, 1791202437LL, 1796058879LL, 1800928489LL,
    1805811301LL, 1810707353LL, 1815616678LL, 1820539314LL, 1825475297LL, 1830424663LL,
    1835387448LL, 1840363688LL, 1845353420LL, 1850356681LL, 1855373507LL, 1860403934LL,
    1865448001LL, 1870505744LL, 1875577199LL, 1880662405LL, 1885761398LL, 1890874216LL,
    1896000896LL, 1901141476LL, 1906295993LL, 1911464486LL, 1916646992LL, 1921843549LL,
    1927054196LL, 1932278970LL, 1937517909LL, 1942771053LL, 1948038440LL, 1953320108LL,
    1958616096LL, 1963926443LL, 1969251188LL, 1974590370LL, 1979944027LL, 1985312200LL,
    1990694927LL, 1996092249LL, 2001504204LL, 2006930832LL, 2012372174LL, 2017828268LL,
    2023299156LL, 2028784876LL, 2034285470LL, 2039800978LL, 2045331439LL, 2050876895LL,
    2056437387LL, 2062012954LL, 2067603638LL, 2073209480LL, 2078830522LL, 2084466803LL,
    2090118366LL, 2095785251LL, 2101467502LL, 2107165158LL, 2112878262LL, 2118606857LL,
    2124350982LL, 2130110682LL, 2135885998LL, 2141676973LL,
};
constexpr int64_t kExp2Lo[256] = {
    1073741824LL, 1073753181LL, 1073764537LL, 1073775894LL, 1073787251LL, 1073798608LL,
    1073809965LL, 1073821323LL, 1073832680LL, 1073844038LL, 1073855395LL, 1073866753LL,
    1073878111LL, 1073889469LL, 1073900827LL, 1073912185LL, 1073923544LL, 1073934902LL,
    1073946261LL, 1073957620LL, 1073968978LL, 1073980337LL, 1073991697LL, 1074003056LL,
    1074014415LL, 1074025775LL, 1074037134LL, 1074048494LL, 1074059854LL, 1074071214LL,
    1074082574LL, 1074093934LL, 1074105294LL, 1074116655LL, 1074128015LL, 1074139376LL,
    1074150737LL, 1074162098LL, 1074173459LL, 1074184820LL, 1074196181LL, 1074207542LL,
    1074218904LL, 1074230266LL, 1074241627LL, 1074252989LL, 1074264351LL, 1074275713LL,
    1074287076LL, 1074298438LL, 1074309800LL, 1074321163LL, 1074332526LL, 1074343888LL,
    1074355251LL, 1074366614LL, 1074377978LL, 1074389341LL, 1074400704LL, 1074412068LL,
    1074423432LL, 1074434795LL, 1074446159LL, 1074457523LL, 1074468888LL, 1074480252LL,
    1074491616LL, 1074502981LL, 1074514345LL, 1074525710LL, 1074537075LL, 1074548440LL,
    1074559805LL, 1074571170LL, 1074582536LL, 1074593901LL, 1074605267LL, 1074616632LL,
    1074627998LL, 1074639364LL, 1074650730LL, 1074662097LL, 1074673463LL, 1074684829LL,
    1074696196LL, 1074707563LL, 1074718929LL, 1074730296LL, 1074741663LL, 1074753030LL,
    1074764398LL, 1074775765LL, 1074787133LL, 1074798500LL, 1074809868LL, 1074821236LL,
    1074832604LL, 1074843972LL, 1074855340LL, 1074866709LL, 1074878077LL, 1074889446LL,
    1074900814LL, 1074912183LL, 1074923552LL, 1074934921LL, 1074946291LL, 1074957660LL,
    1074969029LL, 1074980399LL, 1074991769LL, 1075003138LL, 1075014508LL, 1075025878LL,
    1075037248LL, 1075048619LL, 1075059989LL, 1075071360LL, 1075082730LL, 1075094101LL,
    1075105472LL, 1075116843LL, 1075128214LL, 1075139585LL, 1075150957LL, 1075162328LL,
    1075173700LL, 1075185072LL, 1075196443LL, 1075207815LL, 1075219187LL, 1075230560LL,
    1075241932LL, 1075253304LL, 1075264677LL, 1075276050LL, 1075287423LL, 1075298795LL,
    1075310169LL, 1075321542LL, 1075332915LL, 1075344288LL, 1075355662LL, 1075367036LL,
    1075378409LL, 1075389783LL, 1075401157LL, 1075412531LL, 1075423906LL, 1075435280LL,
    1075446654LL, 1075458029LL, 1075469404LL, 1075480779LL, 1075492154LL, 1075503529LL,
    1075514904LL, 1075526279LL, 1075537655LL, 1075549030LL, 1075560406LL, 1075571782LL,
    1075583158LL, 1075594534LL, 1075605910LL, 1075617286LL, 1075628663LL, 1075640039LL,
    1075651416LL, 1075662793LL, 1075674170LL, 1075685547LL, 1075696924LL, 1075708301LL,
    1075719678LL, 1075731056LL, 1075742434LL, 1075753811LL, 1075765189LL, 1075776567LL,
    1075787945LL, 1075799324LL, 1075810702LL, 1075822080LL, 1075833459LL, 1075844838LL,
    1075856216LL, 1075867595LL, 1075878974LL, 1075890354LL, 1075901733LL, 1075913112LL,
    1075924492LL, 1075935872LL, 1075947251LL, 1075958631LL, 1075970011LL, 1075981391LL,
    1075992772LL, 1076004152LL, 1076015533LL, 1076026913LL, 1076038294LL, 1076049675LL,
    1076061056LL, 1076072437LL, 1076083818LL, 1076095200LL, 1076106581LL, 1076117963LL,
    1076129344LL, 1076140726LL, 1076152108LL, 1076163490LL, 1076174872LL, 1076186255LL,
    1076197637LL, 1076209020LL, 1076220402LL, 1076231785LL, 1076243168LL, 1076254551LL,
    1076265934LL, 1076277318LL, 1076288701LL, 1076300085LL, 1076311468LL, 1076322852LL,
    1076334236LL, 1076345620LL, 1076357004LL, 1076368388LL, 1076379773LL, 1076391157LL,
    1076402542LL, 1076413926LL, 1076425311LL, 1076436696LL, 1076448081LL, 1076459466LL,
    1076470852LL, 1076482237LL, 1076493623LL, 1076505009LL, 1076516394LL, 1076527780LL,
    1076539166LL, 1076550552LL, 1076561939LL, 1076573325LL, 1076584712LL, 1076596098LL,
    1076607485LL, 1076618872LL, 1076630259LL, 1076641646LL,
};

// W(d) of reference.py: the probability relative to the row's max on an integer grid, exact and order-free.
inline int64_t weight(double d) {
  double t = d * kLog2e;
  t = t < -64.0 ? -64.0 : t;
  const int64_t u = static_cast<int64_t>(std::floor(t * 65536.0));
  const int64_t n = u >> 16;  // floor(u / 2^16): arithmetic shift
  const int64_t j = u & 0xFFFF;
  const int64_t prod = kExp2Hi[j >> 8] * kExp2Lo[j & 255];
  const int64_t shift = (60 - kWeightBits) - n;
  return shift < 63 ? (prod >> shift) : 0;
}

inline uint32_t hash_bits(uint32_t row, uint32_t c, uint32_t k0, uint32_t k1) {
  return fastml::counter_mix(fastml::counter_mix(fastml::counter_mix(c ^ k0) + k1) ^ row);
}

// The Gumbel variable of token col from its first word h1 = h(row, 2 col) (the second is hashed here).
inline double gumbel(uint32_t h1, uint32_t row, int64_t col, uint32_t k0, uint32_t k1) {
  const uint32_t c = static_cast<uint32_t>(2 * col);
  const uint64_t a = h1 >> 6, b = hash_bits(row, c + 1, k0, k1) >> 6;
  const double u = (static_cast<double>((a << 26) + b) + 0.5) * 0x1p-52;
  return -std::log(-std::log(u));
}

// Upper bounds of the Gumbel variable by the top 12 bits of h1: u < (b + 1) / 4096, and -log(-log(u)) grows
// with u. A token whose x + bound is below the best score so far cannot win the race and is skipped without its
// logs, which leaves the winner unchanged (most tokens of a long row are skipped this way).
struct GumbelBounds {
  double up[4096];
  GumbelBounds() {
    for (int b = 0; b < 4095; ++b) up[b] = -std::log(-std::log((b + 1) / 4096.0)) + 1e-9;
    up[4095] = std::numeric_limits<double>::infinity();
  }
};
const GumbelBounds kGumbelBounds;

// Order-preserving unsigned key of a finite float / double (-0 folded onto +0).
template <typename A>
struct KeyOf;
template <>
struct KeyOf<float> {
  using K = uint32_t;
  static constexpr int kBits = 32;
  static inline K key(float x) {
    x += 0.0f;  // -0 + 0 = +0
    uint32_t b;
    std::memcpy(&b, &x, 4);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
  }
  static constexpr K kNegInf = ~K(0xFF800000u);  // key(-inf); every finite key is larger
};
template <>
struct KeyOf<double> {
  using K = uint64_t;
  static constexpr int kBits = 64;
  static inline K key(double x) {
    x += 0.0;
    uint64_t b;
    std::memcpy(&b, &x, 8);
    return (b & 0x8000000000000000ull) ? ~b : (b | 0x8000000000000000ull);
  }
  static constexpr K kNegInf = ~K(0xFFF0000000000000ull);
};

template <typename A>
struct Scratch {
  using K = typename KeyOf<A>::K;
  std::vector<A> x;           // a chunk of scaled values
  std::vector<int32_t> idx;   // candidates: token ids
  std::vector<K> key;         // their keys
  std::vector<int64_t> w;     // their weights
  std::vector<K> lkey;        // top-k: the keys of the boundary bin
  std::vector<int32_t> lidx;  //        and their ids
  std::vector<K> wk;          // radix work: keys
  std::vector<int64_t> ww;    //             weights
  std::vector<K> rowkey;      // the keys of the whole row
  uint32_t hist[4 * 2048];
  void reserve(int64_t V) {
    if (static_cast<int64_t>(x.size()) < kChunk) x.resize(kChunk);
    if (static_cast<int64_t>(idx.size()) < V) {
      idx.resize(V);
      rowkey.resize(V);
      key.resize(V);
      w.resize(V);
      lkey.resize(V);
      lidx.resize(V);
      wk.resize(V);
      ww.resize(V);
    }
  }
};

template <typename A>
Scratch<A>& scratch() {
  thread_local Scratch<A> s;
  return s;
}

// The rank-th largest (1-based) of keys[0:n] by 8-bit radix levels over the low `bits` bits (the higher bits are
// equal); keys is used as work space.
template <typename K>
K kth_largest(K* keys, int64_t n, int64_t rank, int bits) {
  uint32_t cnt[256];
  while (bits > 0 && n > 1) {
    const int wdt = std::min(8, bits);
    const int shift = bits - wdt;
    const K mask = (K(1) << wdt) - 1;
    std::fill(cnt, cnt + 256, 0u);
    for (int64_t i = 0; i < n; ++i) ++cnt[(keys[i] >> shift) & mask];
    int dgt = static_cast<int>(mask);
    int64_t above = 0;
    for (; dgt > 0; --dgt) {
      if (above + static_cast<int64_t>(cnt[dgt]) >= rank) break;
      above += cnt[dgt];
    }
    rank -= above;
    int64_t m = 0;
    for (int64_t i = 0; i < n; ++i) {
      if (static_cast<int>((keys[i] >> shift) & mask) == dgt) keys[m++] = keys[i];
    }
    n = m;
    bits = shift;
  }
  return keys[0];
}

// The smallest key whose mass strictly above is < thr (thr > 0), over keys / weights [0:n] (work space).
template <typename K>
K top_p_key(K* keys, int64_t* w, int64_t n, double thr, int bits) {
  uint32_t cnt[256];
  int64_t mass[256];
  int64_t offset = 0;
  while (bits > 0) {
    const int wdt = std::min(8, bits);
    const int shift = bits - wdt;
    const K mask = (K(1) << wdt) - 1;
    std::fill(cnt, cnt + 256, 0u);
    std::fill(mass, mass + 256, int64_t(0));
    for (int64_t i = 0; i < n; ++i) {
      const int d = static_cast<int>((keys[i] >> shift) & mask);
      ++cnt[d];
      mass[d] += w[i];
    }
    int chosen = -1;
    int64_t acc = offset, at = offset;
    for (int d = static_cast<int>(mask); d >= 0; --d) {
      if (cnt[d] == 0) continue;
      if (static_cast<double>(acc) < thr) {
        chosen = d;
        at = acc;
        acc += mass[d];
      } else {
        break;
      }
    }
    TORCH_CHECK(chosen >= 0, "fastml::sampling: top-p search lost its bound (internal error)");
    int64_t m = 0;
    for (int64_t i = 0; i < n; ++i) {
      if (static_cast<int>((keys[i] >> shift) & mask) == chosen) {
        keys[m] = keys[i];
        w[m] = w[i];
        ++m;
      }
    }
    n = m;
    offset = at;
    bits = shift;
  }
  return keys[0];
}

struct RowParams {
  double temperature, top_p, log_min_p;
  int64_t top_k;
};

enum Status : uint8_t { kOk = 0, kNaN = 1, kPosInf = 2, kNoFinite = 3 };

// What the filters decided for one row: the kept set is {finite x: key(x) >= threshold, x - max >= log_min_p}
// (on the candidate list when `listed`, else on the whole row) plus keep_ids.
template <typename A>
struct RowPlan {
  using K = typename KeyOf<A>::K;
  A max;
  K threshold;
  bool listed;  // the kept set lies within s.idx[0:n]
  int64_t n;
  uint8_t status;
};

template <typename scalar_t, typename A>
inline A scaled(const scalar_t* row, int64_t i, A t) {
  return static_cast<A>(row[i]) / t;
}

// Steps 1-3 of the header for one row.
template <typename scalar_t, typename A>
RowPlan<A> plan_row(const scalar_t* __restrict row, int64_t V, const RowParams& p, Scratch<A>& s) {
  using KO = KeyOf<A>;
  using K = typename KO::K;
  constexpr int kTop = KO::kBits - 11;  // the histogram's bins: the top 11 bits of a key
  constexpr A kInf = std::numeric_limits<A>::infinity();
  RowPlan<A> plan{};
  plan.threshold = 0;
  plan.listed = false;
  plan.n = 0;
  const A t = static_cast<A>(p.temperature);
  const bool topk = p.top_k > 0 && p.top_k < V;
  // Top-k guess: tau = the r-th largest key of a strided sample of S tokens, r about twice k's share of the
  // sample plus a margin. Pass 1 gathers every token with key >= tau (about r * V / S of them); when there are at
  // least k, the k-th largest is among them, else the histogram path below runs.
  K tau = 0;
  bool guess = false;
  if (topk && V >= 8192) {
    const int64_t S = 4096, stride = V / S;
    const int64_t r = (2 * p.top_k * S + V - 1) / V + 8;
    if (r <= S / 8) {
      for (int64_t j = 0; j < S; ++j) s.wk[j] = KO::key(scaled(row, j * stride, t));
      tau = kth_largest<K>(s.wk.data(), S, r, KO::kBits);
      guess = true;
    }
  }
  // Pass 1.
  A mx = -kInf;
  int64_t nfinite = 0, nnan = 0, npinf = 0, nl = 0;
  K* __restrict keys = s.rowkey.data();
  A* __restrict xb = s.x.data();
  for (int64_t c0 = 0; c0 < V; c0 += kChunk) {
    const int64_t n = std::min(kChunk, V - c0);
    K* __restrict kc = keys + c0;
    for (int64_t i = 0; i < n; ++i) xb[i] = static_cast<A>(row[c0 + i]) / t;
    for (int64_t i = 0; i < n; ++i) kc[i] = KO::key(xb[i]);
    int64_t fin = 0, cnan = 0, cinf = 0;
    A cmx = -kInf;
#pragma omp simd reduction(+ : fin, cnan, cinf) reduction(max : cmx)
    for (int64_t i = 0; i < n; ++i) {
      const A x = xb[i];
      cnan += x != x;
      cinf += x == kInf;
      fin += (x > -kInf) & (x < kInf);
      cmx = x > cmx ? x : cmx;
    }
    nnan += cnan;
    npinf += cinf;
    nfinite += fin;
    mx = std::max(mx, cmx);
    if (guess) {
      // Blocks of 64 with a vectorized "any key >= tau" first: most blocks hold none.
      for (int64_t b = 0; b < n; b += 64) {
        const int64_t e = std::min(n, b + 64);
        int any = 0;
        for (int64_t i = b; i < e; ++i) any |= kc[i] >= tau;
        if (!any) continue;
        for (int64_t i = b; i < e; ++i) {
          if (kc[i] >= tau && kc[i] != KO::kNegInf) {
            s.lidx[nl] = static_cast<int32_t>(c0 + i);
            s.lkey[nl++] = kc[i];
          }
        }
      }
    }
  }
  if (nnan) {
    plan.status = kNaN;
    return plan;
  }
  if (npinf) {
    plan.status = kPosInf;
    return plan;
  }
  if (nfinite == 0) {
    plan.status = kNoFinite;
    return plan;
  }
  plan.status = kOk;
  plan.max = mx;
  const bool use_k = topk && p.top_k < nfinite;
  const bool use_p = p.top_p < 1.0;
  if (!use_k && !use_p) return plan;
  int64_t n = 0;
  if (use_k) {
    K kth;
    if (guess && nl >= p.top_k) {
      std::copy(s.lkey.begin(), s.lkey.begin() + nl, s.wk.begin());
      kth = kth_largest<K>(s.wk.data(), nl, p.top_k, KO::kBits);
    } else {
      // Histogram of the top 11 bits (four interleaved copies, so that runs of one bin do not wait on each
      // other's increments), the bin of the k-th largest, then the tokens at and above it.
      uint32_t* h = s.hist;
      std::fill(h, h + 4 * 2048, 0u);
      int64_t i = 0;
      for (; i + 4 <= V; i += 4) {
        ++h[keys[i] >> kTop];
        ++h[2048 + (keys[i + 1] >> kTop)];
        ++h[4096 + (keys[i + 2] >> kTop)];
        ++h[6144 + (keys[i + 3] >> kTop)];
      }
      for (; i < V; ++i) ++h[keys[i] >> kTop];
      for (int b = 0; b < 2048; ++b) h[b] += h[2048 + b] + h[4096 + b] + h[6144 + b];
      h[KO::kNegInf >> kTop] -= static_cast<uint32_t>(V - nfinite);  // -inf is no candidate
      int64_t above = 0;
      int b0 = 2047;
      for (; b0 > 0; --b0) {
        if (above + h[b0] >= p.top_k) break;
        above += h[b0];
      }
      const K lo = static_cast<K>(b0) << kTop;
      nl = 0;
      for (int64_t j = 0; j < V; ++j) {
        const K k = keys[j];
        if (k >= lo && k != KO::kNegInf) {
          s.lidx[nl] = static_cast<int32_t>(j);
          s.lkey[nl++] = k;
        }
      }
      int64_t nb = 0;
      for (int64_t j = 0; j < nl; ++j) {
        if ((s.lkey[j] >> kTop) == static_cast<K>(b0)) s.wk[nb++] = s.lkey[j];
      }
      kth = kth_largest<K>(s.wk.data(), nb, p.top_k - above, kTop);
    }
    for (int64_t j = 0; j < nl; ++j) {
      if (s.lkey[j] >= kth) {
        s.idx[n] = s.lidx[j];
        s.key[n++] = s.lkey[j];
      }
    }
    plan.threshold = kth;
  } else {
    for (int64_t i = 0; i < V; ++i) {
      if (keys[i] == KO::kNegInf) continue;
      s.idx[n] = static_cast<int32_t>(i);
      s.key[n++] = keys[i];
    }
  }
  plan.listed = true;
  plan.n = n;
  if (use_p) {
    const double m64 = static_cast<double>(mx);
    int64_t z = 0;
    for (int64_t j = 0; j < n; ++j) {
      const int64_t wj = weight(static_cast<double>(scaled(row, s.idx[j], t)) - m64);
      s.wk[j] = s.key[j];
      s.ww[j] = wj;
      z += wj;
    }
    const double thr = p.top_p * static_cast<double>(z);
    const K kp = thr > 0 ? top_p_key<K>(s.wk.data(), s.ww.data(), n, thr, KO::kBits) : KO::key(mx);
    plan.threshold = std::max(plan.threshold, kp);
  }
  return plan;
}

template <typename A>
inline bool keeps(A x, const RowPlan<A>& plan, double m64, double lmp) {
  return x > -std::numeric_limits<A>::infinity() && KeyOf<A>::key(x) >= plan.threshold &&
         static_cast<double>(x) - m64 >= lmp;
}

[[noreturn]] void raise_row(int64_t r, uint8_t status) {
  if (status == kNaN) TORCH_CHECK_VALUE(false, "logits row ", r, " contains NaN");
  if (status == kPosInf) {
    TORCH_CHECK_VALUE(false, "logits row ", r, " contains +inf (after dividing by the temperature)");
  }
  TORCH_CHECK_VALUE(false, "logits row ", r, " has no finite value");
}

void check_status(const std::vector<uint8_t>& status) {
  for (size_t r = 0; r < status.size(); ++r) {
    if (status[r] != kOk) raise_row(static_cast<int64_t>(r), status[r]);
  }
}

struct Inputs {
  int64_t B, V;
  const double* temperature;
  const int64_t* top_k;
  const double* top_p;
  const double* log_min_p;
  const int64_t* keep;
  int64_t nkeep;
  RowParams row(int64_t r) const { return {temperature[r], top_p[r], log_min_p[r], top_k[r]}; }
};

Inputs check_inputs(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& top_k,
                    const at::Tensor& top_p, const at::Tensor& log_min_p, const at::Tensor& keep_ids) {
  TORCH_CHECK_VALUE(logits.dim() == 2 && logits.size(1) >= 1 && logits.is_contiguous(),
                    "fastml::sampling: logits must be a contiguous [B, V] tensor with V >= 1");
  const int64_t B = logits.size(0), V = logits.size(1);
  TORCH_CHECK_VALUE(V <= (int64_t(1) << 26), "fastml::sampling: V must be at most 2^26");
  auto row_tensor = [&](const at::Tensor& t, at::ScalarType st, const char* name) {
    TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == B && t.scalar_type() == st && t.is_contiguous() &&
                          t.device() == logits.device(),
                      "fastml::sampling: ", name, " must be a contiguous [B] tensor of ", st);
  };
  row_tensor(temperature, at::kDouble, "temperature");
  row_tensor(top_k, at::kLong, "top_k");
  row_tensor(top_p, at::kDouble, "top_p");
  row_tensor(log_min_p, at::kDouble, "log_min_p");
  TORCH_CHECK_VALUE(keep_ids.dim() == 1 && keep_ids.scalar_type() == at::kLong && keep_ids.is_contiguous(),
                    "fastml::sampling: keep_ids must be a contiguous 1-D int64 tensor");
  Inputs in{B, V, temperature.data_ptr<double>(), top_k.data_ptr<int64_t>(), top_p.data_ptr<double>(),
            log_min_p.data_ptr<double>(), keep_ids.data_ptr<int64_t>(), keep_ids.numel()};
  for (int64_t j = 0; j < in.nkeep; ++j) {
    TORCH_CHECK_INDEX(in.keep[j] >= 0 && in.keep[j] < V, "fastml::sampling: keep_ids must be in [0, ", V, ")");
  }
  return in;
}

template <typename scalar_t>
void filter_impl(const at::Tensor& logits, const Inputs& in, double filter_value, at::Tensor& out) {
  using A = at::opmath_type<scalar_t>;
  using K = typename KeyOf<A>::K;
  const scalar_t* lp = logits.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  std::vector<uint8_t> status(in.B, kOk);
  const scalar_t fill = static_cast<scalar_t>(filter_value);
  at::parallel_for(0, in.B, 1, [&](int64_t r0, int64_t r1) {
    Scratch<A>& s = scratch<A>();
    s.reserve(in.V);
    for (int64_t r = r0; r < r1; ++r) {
      const RowParams p = in.row(r);
      const scalar_t* __restrict row = lp + r * in.V;
      scalar_t* __restrict orow = op + r * in.V;
      const RowPlan<A> plan = plan_row<scalar_t, A>(row, in.V, p, s);
      status[r] = plan.status;
      if (plan.status != kOk) continue;
      const A t = static_cast<A>(p.temperature);
      const double m64 = static_cast<double>(plan.max);
      const K* __restrict keys = s.rowkey.data();
      const K thr = plan.threshold;
      const double lmp = p.log_min_p;
      const A fa = static_cast<A>(fill);
      constexpr K kNeg = KeyOf<A>::kNegInf;
      if (lmp == -std::numeric_limits<double>::infinity()) {
        for (int64_t i = 0; i < in.V; ++i) {
          const A x = static_cast<A>(row[i]) / t;
          const K k = keys[i];
          A o = k >= thr ? x : fa;
          o = k != kNeg ? o : fa;
          orow[i] = static_cast<scalar_t>(o);
        }
      } else {
        for (int64_t i = 0; i < in.V; ++i) {
          const A x = static_cast<A>(row[i]) / t;
          const K k = keys[i];
          A o = k >= thr ? x : fa;
          o = k != kNeg ? o : fa;
          o = static_cast<double>(x) - m64 >= lmp ? o : fa;
          orow[i] = static_cast<scalar_t>(o);
        }
      }
      for (int64_t j = 0; j < in.nkeep; ++j) orow[in.keep[j]] = static_cast<scalar_t>(scaled(row, in.keep[j], t));
    }
  });
  check_status(status);
}

// The state of a Gumbel-max race over part of a row: the best score, its token (lowest id on ties) and, for the
// log-probability, the sum of exp(x - max) over the tokens visited.
struct Race {
  double best = -std::numeric_limits<double>::infinity();
  double sum = 0.0;
  int64_t bi = -1;
  void offer(double sc, int64_t i) {
    if (sc > best || (sc == best && i < bi) || bi < 0) {
      best = sc;
      bi = i;
    }
  }
  void merge(const Race& o) {
    sum += o.sum;
    if (o.bi >= 0) offer(o.best, o.bi);
  }
};

constexpr int64_t kRaceChunk = 8192;  // fixed, so that the sums do not depend on the thread count

// The race over domain entries [j0, j1): token ids list[j] (list != nullptr) or j itself. Kept tokens are raced
// in batches of 64: their first hash words come from one vectorized loop, then each is checked against the
// bound (kGumbelBounds) before its second word and logs.
template <typename scalar_t, typename A>
Race race_range(const scalar_t* row, A t, const RowPlan<A>& plan, double m64, double lmp, uint32_t ur, uint32_t k0,
                uint32_t k1, bool logprobs, const int32_t* list, int64_t j0, int64_t j1) {
  constexpr A kInf = std::numeric_limits<A>::infinity();
  Race race;
  int64_t bid[64];
  double bx[64];
  uint32_t bh[64];
  int nb = 0;
  auto flush = [&]() {
    for (int j = 0; j < nb; ++j) bh[j] = hash_bits(ur, static_cast<uint32_t>(2 * bid[j]), k0, k1);
    if (logprobs) {
      for (int j = 0; j < nb; ++j) race.sum += std::exp(bx[j] - m64);
    }
    for (int j = 0; j < nb; ++j) {
      const double x64 = bx[j];
      if (x64 + kGumbelBounds.up[bh[j] >> 20] < race.best) continue;
      race.offer(x64 + gumbel(bh[j], ur, bid[j], k0, k1), bid[j]);
    }
    nb = 0;
  };
  auto visit = [&](int64_t i, A x) {
    bid[nb] = i;
    bx[nb++] = static_cast<double>(x);
    if (nb == 64) flush();
  };
  if (list != nullptr) {
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t i = list[j];
      const A x = scaled(row, i, t);
      if (keeps(x, plan, m64, lmp)) visit(i, x);
    }
  } else {
    // Blocks of 64 with a vectorized "any kept" test first (min-p alone keeps few).
    for (int64_t b = j0; b < j1; b += 64) {
      const int64_t e = std::min(j1, b + 64);
      int any = 0;
      for (int64_t i = b; i < e; ++i) {
        const A x = static_cast<A>(row[i]) / t;
        any |= (x > -kInf) & (static_cast<double>(x) - m64 >= lmp);
      }
      if (!any) continue;
      for (int64_t i = b; i < e; ++i) {
        const A x = scaled(row, i, t);
        if (keeps(x, plan, m64, lmp)) visit(i, x);
      }
    }
  }
  flush();
  return race;
}

template <typename scalar_t>
void sample_impl(const at::Tensor& logits, const Inputs& in, uint32_t k0, uint32_t k1, bool logprobs,
                 at::Tensor& tokens, at::Tensor& lps) {
  using A = at::opmath_type<scalar_t>;
  const scalar_t* lp = logits.data_ptr<scalar_t>();
  int64_t* tok = tokens.data_ptr<int64_t>();
  float* lpo = logprobs ? lps.data_ptr<float>() : nullptr;
  std::vector<uint8_t> status(in.B, kOk);
  constexpr A kInf = std::numeric_limits<A>::infinity();
  auto do_row = [&](int64_t r, Scratch<A>& s) {
    const RowParams p = in.row(r);
    const scalar_t* row = lp + r * in.V;
    if (p.temperature == 0) {
      // Greedy: the lowest id among the maxima.
      int64_t best = -1;
      A bx = -kInf;
      bool nan = false, pinf = false;
      for (int64_t i = 0; i < in.V; ++i) {
        const A x = static_cast<A>(row[i]);
        nan |= x != x;
        pinf |= x == kInf;
        if (x > bx) {
          bx = x;
          best = i;
        }
      }
      status[r] = nan ? kNaN : pinf ? kPosInf : best < 0 ? kNoFinite : kOk;
      tok[r] = best;
      if (lpo) lpo[r] = 0.0f;
      return;
    }
    const RowPlan<A> plan = plan_row<scalar_t, A>(row, in.V, p, s);
    status[r] = plan.status;
    if (plan.status != kOk) return;
    const A t = static_cast<A>(p.temperature);
    const double m64 = static_cast<double>(plan.max);
    const uint32_t ur = static_cast<uint32_t>(r);
    const int32_t* list = plan.listed ? s.idx.data() : nullptr;
    const int64_t domain = plan.listed ? plan.n : in.V;
    const int64_t nch = (domain + kRaceChunk - 1) / kRaceChunk;
    // Chunks of the row in parallel when the rows alone do not fill the threads (inside the parallel loop over
    // rows, at::parallel_for runs them inline); merged in chunk order.
    Race parts[64];
    Race race;
    for (int64_t c0 = 0; c0 < nch; c0 += 64) {
      const int64_t c1 = std::min(nch, c0 + 64);
      at::parallel_for(c0, c1, 1, [&](int64_t a, int64_t b) {
        for (int64_t c = a; c < b; ++c) {
          parts[c - c0] = race_range<scalar_t, A>(row, t, plan, m64, p.log_min_p, ur, k0, k1, logprobs, list,
                                                  c * kRaceChunk, std::min(domain, (c + 1) * kRaceChunk));
        }
      });
      for (int64_t c = c0; c < c1; ++c) race.merge(parts[c - c0]);
    }
    // keep_ids the filters removed
    Race extra;
    for (int64_t j = 0; j < in.nkeep; ++j) {
      const int64_t i = in.keep[j];
      const A x = scaled(row, i, t);
      if (keeps(x, plan, m64, p.log_min_p) || !(x > -kInf)) continue;
      const double x64 = static_cast<double>(x);
      if (logprobs) extra.sum += std::exp(x64 - m64);
      extra.offer(x64 + gumbel(hash_bits(ur, static_cast<uint32_t>(2 * i), k0, k1), ur, i, k0, k1), i);
    }
    race.merge(extra);
    tok[r] = race.bi;
    if (lpo) lpo[r] = static_cast<float>(static_cast<double>(scaled(row, race.bi, t)) - m64 - std::log(race.sum));
  };
  if (in.B < at::get_num_threads()) {
    Scratch<A>& s = scratch<A>();
    s.reserve(in.V);
    for (int64_t r = 0; r < in.B; ++r) do_row(r, s);
  } else {
    at::parallel_for(0, in.B, 1, [&](int64_t r0, int64_t r1) {
      Scratch<A>& s = scratch<A>();
      s.reserve(in.V);
      for (int64_t r = r0; r < r1; ++r) do_row(r, s);
    });
  }
  check_status(status);
}

at::Tensor sampling_filter_cpu(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& top_k,
                               const at::Tensor& top_p, const at::Tensor& log_min_p, const at::Tensor& keep_ids,
                               double filter_value) {
  const Inputs in = check_inputs(logits, temperature, top_k, top_p, log_min_p, keep_ids);
  for (int64_t r = 0; r < in.B; ++r) {
    TORCH_CHECK_VALUE(in.temperature[r] > 0, "fastml::sampling: the filter needs temperature > 0");
  }
  auto out = at::empty_like(logits);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "sampling_filter", [&] {
    filter_impl<scalar_t>(logits, in, filter_value, out);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> sampling_sample_cpu(const at::Tensor& logits, const at::Tensor& temperature,
                                                       const at::Tensor& top_k, const at::Tensor& top_p,
                                                       const at::Tensor& log_min_p, const at::Tensor& keep_ids,
                                                       const at::Tensor& seed, bool logprobs) {
  const Inputs in = check_inputs(logits, temperature, top_k, top_p, log_min_p, keep_ids);
  TORCH_CHECK_VALUE(seed.scalar_type() == at::kLong && seed.numel() == 1,
                    "fastml::sampling: seed must be an int64 tensor with one element");
  const uint64_t sv = static_cast<uint64_t>(seed.item<int64_t>());
  const uint32_t k0 = static_cast<uint32_t>(sv & 0xFFFFFFFFu), k1 = static_cast<uint32_t>(sv >> 32);
  auto tokens = at::empty({in.B}, logits.options().dtype(at::kLong));
  auto lps = at::empty({logprobs ? in.B : 0}, logits.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "sampling_sample", [&] {
    sample_impl<scalar_t>(logits, in, k0, k1, logprobs, tokens, lps);
  });
  return {tokens, lps};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastml, CPU, m) {
  m.impl("sampling_filter", &sampling_filter_cpu);
  m.impl("sampling_sample", &sampling_sample_cpu);
}
