// The NCE terms of docs/method.md with a frozen partition estimate Z, written in the stable softplus
// form. With c = log(K * Z) and score s = <x, m> / T:
//   positive: -log(e^s / (e^s + K Z))   = softplus(c - s),  d/ds = -sigmoid(c - s)
//   negative: -log(K Z / (e^s + K Z))   = softplus(s - c),  d/ds =  sigmoid(s - c)
// Each term depends on its own score only, so the gradient of a row's loss in x is
// sum_j (dL/ds_j) * m_j / T and can be accumulated while m_j is being read.
#pragma once

#include "ops/common.h"

namespace avidfast {

template <typename T>
AVF_HD T softplus(T z) {
  const T positive_part = z > T(0) ? z : T(0);
  const T magnitude = z > T(0) ? -z : z;  // -|z|
  return positive_part + log1p_(exp_(magnitude));
}

template <typename T>
AVF_HD T sigmoid(T z) {
  if (z >= T(0)) return T(1) / (T(1) + exp_(-z));
  const T e = exp_(z);
  return e / (T(1) + e);
}

// Loss and d(loss)/d(score) of one positive score s against log(K Z) = c.
template <typename T>
AVF_HD void nce_positive(T s, T c, T& loss, T& dloss_ds) {
  loss = softplus(c - s);
  dloss_ds = -sigmoid(c - s);
}

// Loss and d(loss)/d(score) of one negative score s against log(K Z) = c.
template <typename T>
AVF_HD void nce_negative(T s, T c, T& loss, T& dloss_ds) {
  loss = softplus(s - c);
  dloss_ds = sigmoid(s - c);
}

}  // namespace avidfast
